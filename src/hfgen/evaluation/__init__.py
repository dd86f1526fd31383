"""Evaluation of generative models on three criteria: quality, diversity and speed.

    text.py     pure text metrics (distinct-n, BLEU/self-BLEU, win rate) and model-based ones (perplexity,
                reward-model scores, embedding self-similarity)
    speed.py    generation throughput (tokens/s, images/s) and peak memory
    images.py   image metrics (digit classifier adherence, Fréchet distance, pairwise distance)
    command.py  `hfgen eval TARGET`: runs them on a model or run dir and writes TARGET/eval.json

Keys written to eval.json are grouped by criterion: `quality/...`, `diversity/...`, `speed/...`, and the
settings they were measured under in `eval/...`, so they never collide with a stage's own figures.
"""
