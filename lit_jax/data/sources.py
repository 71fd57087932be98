"""Config `sources` (files/globs) -> Records, each file read by the reader its kind needs.

A file's kind: `.jsonl` = our record format; `.csv` = a classification set; `.json` named
control/stimulus/system/stimulus_completion = a LatentQA behaviour file (joined with
`latentqa_qa`); any other `.json` with `samples` + `prompt_templates` = a relation.
Records keep their file's display name (path relative to data_dir) and record index.
"""

from __future__ import annotations

import glob
import os
import zlib

import numpy as np
from ml_collections import ConfigDict

from lit_jax.data.classification import read_classification
from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.jsonfile import load_json
from lit_jax.data.latentqa import QA, latentqa_kind, load_qa, read_latentqa
from lit_jax.data.records import Record, read_jsonl
from lit_jax.data.relations import is_relation_file, read_relation


def expand_sources(specs, data_dir: str) -> list[str]:
    """Absolute paths of the files named by `specs` (globs allowed), in order, without repeats."""
    paths: list[str] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.join(data_dir, os.path.expanduser(spec))))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"source {spec!r} matches no file under {data_dir}")
        paths += [os.path.abspath(m) for m in matches if os.path.abspath(m) not in paths]
    return paths


def display_name(path: str, data_dir: str) -> str:
    rel = os.path.relpath(path, data_dir)
    return path if rel.startswith("..") else rel


def family(path: str) -> str:
    """Which label namespace a file's labels live in (the split is made per family)."""
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".csv"):
        return "classification"
    return "latentqa" if latentqa_kind(path) else "relations"


def read_source(path: str, cfg: ConfigDict, bad: BadRecords, data_dir: str, qa: dict) -> list[Record]:
    """The Records of one file (qa: a cache holding the LatentQA QA table once loaded)."""
    display = display_name(path, data_dir)
    if path.endswith(".jsonl"):
        return read_jsonl(path, bad, display)
    if path.endswith(".csv"):
        return read_classification(path, bad, display)
    if not path.endswith(".json"):
        raise DataError(f"{display}: unknown source type (expected .jsonl, .csv or .json)")
    if latentqa_kind(path):
        if "table" not in qa:
            qa_path = os.path.join(data_dir, cfg.latentqa_qa)
            qa["table"] = load_qa(qa_path, display_name(qa_path, data_dir))
        return read_latentqa(path, qa["table"], bad, display, qa_display=cfg.latentqa_qa)
    if is_relation_file(load_json(path, display)):
        return read_relation(path, bad, question_template=cfg.relation_question, label_by=cfg.relations_label,
                             display=display)
    raise DataError(
        f"{display}: unknown JSON source (neither a LatentQA control/stimulus/system/stimulus_completion file "
        "nor a relation file with 'samples' and 'prompt_templates')"
    )


def limit_records(records: list[Record], max_records: int, seed: int, name: str) -> list[Record]:
    """At most `max_records` input records (file rows; all QA pairs of a kept row stay), seeded, in file order."""
    indices = sorted({r.index for r in records})
    if max_records <= 0 or len(indices) <= max_records:
        return records
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    keep = set(rng.choice(indices, size=max_records, replace=False).tolist())
    return [r for r in records if r.index in keep]


def read_all_sources(cfg: ConfigDict, data_dir: str, bad: BadRecords) -> list[tuple[str, list[Record]]]:
    """[(family, records of one file)] for every configured file, in config order."""
    qa: dict[str, QA] = {}
    out = []
    for path in expand_sources(cfg.sources, data_dir):
        records = read_source(path, cfg, bad, data_dir, qa)
        records = limit_records(records, cfg.max_records_per_source, cfg.split_seed, display_name(path, data_dir))
        out.append((family(path), records))
    return out
