"""Rows a multi-process epoch trains twice: accelerate's `even_batches` completes the last batches with copies."""

import pytest
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from hfgen import loop


@pytest.mark.parametrize(
    ("rows", "batch", "processes", "repeated"), [(3, 2, 2, 1), (10, 4, 3, 2), (12, 2, 3, 0), (5, 8, 1, 0), (8, 2, 2, 0)]
)
def test_repeated_rows_counts_the_copies_accelerate_yields(rows, batch, processes, repeated):
    loader = DataLoader(list(range(rows)), batch_size=batch)
    yielded = []
    for index in range(processes):
        shard = prepare_data_loader(loader, num_processes=processes, process_index=index, put_on_device=False)
        assert loop.repeated_rows(shard) == repeated
        yielded += [row for batch_rows in shard for row in batch_rows.tolist()]
    assert sorted(set(yielded)) == list(range(rows))
    assert len(yielded) - rows == repeated  # what the processes actually trained


def test_note_repeated_rows_says_so_and_records_it_in_data_json(tmp_path, capsys):
    from hfgen import tracking

    tracking.write_json(tmp_path / "data.json", {"train": {"rows_kept": 3}})
    shard = prepare_data_loader(DataLoader(list(range(3)), batch_size=2), num_processes=2, process_index=0,
                                put_on_device=False)  # fmt: skip
    loop.note_repeated_rows(shard, tmp_path)
    assert "with 1 copies of its first rows, which train twice per epoch" in capsys.readouterr().err
    assert tracking.read_json(tmp_path / "data.json") == {"train": {"rows_kept": 3}, "train_rows_repeated_per_epoch": 1}
    # 2 rows, 2 processes x 4: each process trains [0, 1, 0, 1], every row 4 times (it said "twice")
    shard = prepare_data_loader(DataLoader(list(range(2)), batch_size=4), num_processes=2, process_index=0,
                                put_on_device=False)  # fmt: skip
    loop.note_repeated_rows(shard, tmp_path)
    assert "with 6 copies of its first rows, which train up to 4 times per epoch" in capsys.readouterr().err
