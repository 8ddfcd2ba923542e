"""Evaluation batches: every record of the files once, in order (no weights, no shuffle, no cycling), rendered,
masked and packed exactly like training.

The tail of the stream becomes one last window padded with EOS inputs and -100 labels, and the last global batch is
filled with all-padding windows (EOS inputs, -100 labels), so shapes stay fixed and every data-parallel replica
yields the same number of batches. Weights in a spec are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .packing import Packer
from .render import RecordFormat, Renderer, check_columns
from .sources import iter_records
from .spec import parse_task_spec
from .tokenize import Encoder

if TYPE_CHECKING:
    from config import DataConfig


def evaluation_batches(paths, tokenizer, data: DataConfig, dp_rank: int = 0, dp_size: int = 1, chunk_docs: int = 256):
    """Yield dicts of int64 tensors [data.batch_size, data.seq_length] (input_ids, labels, position_ids, doc_ids).

    paths: a --task-name style spec ("a.jsonl,dir/,hf:org/name@validation") or a list of them. Records are read,
    rendered and masked as training reads them (the record layout and masking settings of `data`).
    """
    tasks = parse_task_spec(paths, flag="--evaluation-data")
    fmt = RecordFormat.of(data)
    check_columns(tasks, fmt)
    renderer = Renderer(tokenizer, data.train_on_inputs, data.loss_on_bot_only, fmt)
    encoder = Encoder(tokenizer)
    packer = Packer(data.seq_length, data.batch_size, dp_rank, dp_size, 0, encoder.eos)
    files = [f for t in tasks for f in t.files]
    docs = []
    for path, line_no, line in iter_records(files):
        docs.append(renderer.render_line(line, path, line_no))
        if len(docs) >= chunk_docs:
            for batch, _ in packer.feed(None, encoder.encode_chunk(docs)):
                yield batch
            docs = []
    if docs:
        for batch, _ in packer.feed(None, encoder.encode_chunk(docs)):
            yield batch
    for batch, _ in packer.flush():
        yield batch
