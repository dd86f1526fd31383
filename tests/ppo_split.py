"""One PPO update of a tiny policy and value model on a fixed rollout of 4 responses of different lengths, split
per_device_train_batch_size x gradient_accumulation_steps x processes as asked: the token-weighted losses must give
the same update for every split (tests/stages/test_ppo.py). Run as a script under `accelerate launch` for the split
over processes:

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/ppo_split.py BATCH ACCUMULATION OUT.pt
"""

import sys

import torch


def split_update(accelerator, batch: int, accumulation: int, ptx: bool = True) -> torch.Tensor:
    """The update (new weights - start, flat) of one SGD step at learning rate 1 (the gradient itself) over the
    rollout, this process taking its share of the rows; entropy, KL loss and (`ptx`) ptx terms on."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from hfgen.rl.ptx import IGNORE
    from hfgen.rl.rollout import PolicyAndValue
    from hfgen.rl.types import Rollout
    from hfgen.stages.ppo import PPOConfig, ppo_update

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    trainable = PolicyAndValue(LlamaForCausalLM(config), LlamaForSequenceClassification(config))
    input_ids, context = torch.randint(1, 16, (4, 10)), 4
    mask = torch.arange(6) < torch.tensor([[6], [1], [3], [2]])  # responses of 6, 1, 3 and 2 tokens
    with torch.no_grad():
        logprobs = torch.log_softmax(trainable.policy(input_ids).logits[:, context - 1 : -1], -1)
        logprobs = logprobs.gather(-1, input_ids[:, context:, None])[..., 0]
    rollout = Rollout(input_ids, torch.ones_like(input_ids), context, mask, logprobs, logprobs - 0.3,
                      torch.randn(4, 6), torch.zeros(4), torch.randn(4, 6), torch.randn(4, 6))  # fmt: skip
    examples = [
        (torch.randint(1, 16, (n,)).tolist(), [IGNORE] * (n - k) + [1] * k) for n, k in ((8, 6), (5, 2), (7, 3))
    ]
    rows = torch.arange(4).chunk(accelerator.num_processes)[accelerator.process_index]
    rollout = rollout.select(rows)
    start = [p.detach().clone() for p in trainable.parameters()]
    settings = PPOConfig(num_ppo_epochs=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         entropy_coef=0.1, kl_loss_coef=0.5, ptx_coef=0.5 if ptx else 0.0, max_grad_norm=0.0,
                         temperature=1.0)  # fmt: skip
    optimizer = torch.optim.SGD(trainable.parameters(), lr=1.0)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)  # (steps on the accumulation's last only)
    torch.manual_seed(1)  # the same minibatch order and ptx examples
    ppo_update(accelerator, trainable, optimizer, rollout, settings, ptx_data=examples if ptx else None)
    return torch.cat(
        [(p.detach() - q).flatten() for p, q in zip(accelerator.unwrap_model(trainable).parameters(), start)]
    )


if __name__ == "__main__":
    from accelerate import Accelerator

    batch, accumulation, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    update = split_update(accelerator, batch, accumulation, ptx=False)  # (each process draws its own ptx examples)
    if accelerator.is_main_process:
        torch.save(update, out)
