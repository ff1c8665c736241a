"""lm-eval's own tasks (``glue``, ``mmlu``, ...) read their data from the Hugging Face Hub. Without
the Hub, ``datasets`` falls back to its cache (``HF_DATASETS_CACHE``), where a dataset loaded once
on a networked machine stays. This module

* checks, before an editing wrapper makes any edit, that every hub dataset the requested tasks
  need is either reachable or cached, and otherwise stops with one line naming the ways on
  (``preflight``, called from the lm-eval hook); and
* writes such a cache entry from local files (``seqedit hub-cache``): parquet, JSONL or JSON files
  per config and split, as a clone of the dataset's hub repository holds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.errors import UserError

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
CACHE_VERSION, CACHE_HASH = "0.0.0", "seqedit-local-copy"


class HubDataUnavailable(UserError, RuntimeError):
    """Hub datasets that the requested tasks need are neither reachable nor cached."""


def datasets_cache() -> Path:
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE)


def dataset_cache_dir(path: str, cache: Path | None = None) -> Path:
    """Where ``datasets`` keeps the hub dataset ``path`` (e.g. ``nyu-mll___glue``)."""
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = path.split("/")
    return (cache or datasets_cache()) / "___".join([*namespace, camelcase_to_snakecase(name)])


def is_cached(path: str, config: str | None, cache: Path | None = None) -> bool:
    root = dataset_cache_dir(path, cache) / (config or "default")
    return any(root.glob("*/*/dataset_info.json"))


def hub_reachable(timeout: float = 5.0) -> bool:
    import datasets.config

    if datasets.config.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return True
    except Exception:  # DNS failure, refused, timeout, proxy error: all mean "not reachable"
        return False


def hub_datasets_of(task_manager, names) -> dict[str, tuple[str, str | None]]:
    """{leaf task: (dataset_path, dataset_name)} for the tasks, groups and tags ``names`` whose
    data comes from the Hub (a path that is not a local directory or a loader such as 'json')."""
    index = task_manager.task_index
    found: dict[str, tuple[str, str | None]] = {}
    seen: set[str] = set()

    def visit(name):
        if isinstance(name, dict):
            name = name.get("task") or name.get("group")
        if not isinstance(name, str) or name in seen:
            return
        seen.add(name)
        entry = index.get(name)
        if entry is None:
            return
        kind = getattr(entry.kind, "name", str(entry.kind)).upper()
        cfg = entry.cfg or {}
        if kind == "TAG":
            for other in index.values():
                if name in (other.tags or ()):
                    visit(other.name)
        elif kind == "GROUP":
            members = cfg.get("task", [])
            for member in members if isinstance(members, list) else [members]:
                visit(member)
        else:
            path = cfg.get("dataset_path")
            if isinstance(path, str) and path.count("/") == 1 and not Path(path).exists() \
                    and not cfg.get("custom_dataset"):
                found[name] = (path, cfg.get("dataset_name"))

    for name in names:
        visit(name)
    return found


def preflight(task_manager, names) -> None:
    """Raise ``HubDataUnavailable`` with one line when a requested task's hub data can be had
    neither from the Hub nor from the ``datasets`` cache."""
    needed = hub_datasets_of(task_manager, names)
    missing: dict[str, list[str]] = {}
    for path, config in sorted(set(needed.values()), key=str):
        if not is_cached(path, config):
            missing.setdefault(path, []).append(config or "default")
    if not missing or hub_reachable():
        return
    what = "; ".join(f"{p} ({', '.join(c)})" for p, c in missing.items())
    offline = [v for v in OFFLINE_ENV if os.environ.get(v)]
    why = f"{'='.join([offline[0], os.environ[offline[0]]])}" if offline else "no network"
    first = next(iter(missing))
    raise HubDataUnavailable(
        f"the requested tasks need {what} from the Hugging Face Hub, which cannot be reached "
        f"({why}), and the datasets cache {datasets_cache()} has no copy. Either make a local "
        f"copy (copy {dataset_cache_dir(first).name}/ from the datasets cache of a machine that loaded "
        f"it, or build it from its parquet/JSONL files: seqedit hub-cache {first} DIR), or use "
        f"--tasks edit_glue (our offline GLUE/MMLU protocol). No edit was made.")


def write_cache_entry(path: str, config: str | None, splits: dict, cache: Path | None = None) -> Path:
    """Write ``splits`` ({split: list of row dicts, or a datasets.Dataset}) where ``datasets``
    looks for ``load_dataset(path, config)`` without the Hub. Returns the entry's directory."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    directory = dataset_cache_dir(path, cache) / (config or "default") / CACHE_VERSION / CACHE_HASH
    directory.mkdir(parents=True, exist_ok=True)
    builder_name = camelcase_to_snakecase(path.split("/")[-1])
    split_infos, features = {}, None
    for split, rows in splits.items():
        table = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
        features = features or table.features
        target = directory / f"{builder_name}-{split}.arrow"
        with ArrowWriter(path=str(target), features=table.features) as writer:
            writer.write_table(table.data.table)
            count, size = writer.finalize()
        split_infos[split] = datasets.SplitInfo(name=split, num_bytes=size, num_examples=count,
                                                dataset_name=builder_name)
    info = datasets.DatasetInfo(dataset_name=builder_name, config_name=config or "default",
                                features=features, version=CACHE_VERSION,
                                splits=datasets.SplitDict(split_infos, dataset_name=builder_name))
    info.write_to_directory(str(directory))
    return directory


def _read_rows(files: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for file in sorted(files):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(file).to_pylist()
        elif file.name.endswith((".jsonl", ".jsonl.gz")):
            import gzip

            opener = gzip.open if file.suffix == ".gz" else open
            with opener(file, "rt", encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        elif file.suffix == ".json":
            rows += json.loads(file.read_text(encoding="utf-8"))
    return rows


def cache_from_directory(path: str, source: Path, cache: Path | None = None) -> list[Path]:
    """One cache entry per config directory of ``source`` (``<config>/<split>[-...].parquet``
    and the like, as a clone of the hub repository lays them out)."""
    written = []
    if not Path(source).is_dir():
        raise HubDataUnavailable(f"{source}: no such directory; pass the local copy of the hub repository "
                                 "(one sub-directory per config)")
    configs = sorted(d for d in Path(source).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not configs:
        raise HubDataUnavailable(f"{source}: expected one directory per config, e.g. {source}/cola/"
                                "validation-00000-of-00001.parquet")
    for config_dir in configs:
        by_split: dict[str, list[Path]] = {}
        for file in config_dir.iterdir():
            if file.name.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json")):
                by_split.setdefault(file.name.split("-")[0].split(".")[0], []).append(file)
        if by_split:
            written.append(write_cache_entry(
                path, config_dir.name, {s: _read_rows(f) for s, f in sorted(by_split.items())}, cache))
    return written


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="seqedit hub-cache",
        description="Put a Hugging Face hub dataset into the datasets cache from local files, so "
                    "that lm-eval's tasks load it without the Hub.")
    p.add_argument("path", help="the dataset's hub id as the task names it, e.g. nyu-mll/glue")
    p.add_argument("source", type=Path,
                   help="directory with one sub-directory per config holding <split>*.parquet, "
                        ".jsonl(.gz) or .json files (the layout of the hub repository)")
    p.add_argument("--cache", type=Path, default=None,
                   help="datasets cache to write (default: $HF_DATASETS_CACHE or "
                        "~/.cache/huggingface/datasets)")
    args = p.parse_args(argv)
    for directory in cache_from_directory(args.path, args.source, args.cache):
        print(directory)
    return 0
