"""Loading and normalising edit requests.

Every dataset becomes a list of :class:`EditRequest`: a ROME-style prompt template with ``{}``
where the subject goes, the subject, the new and the true target, and whatever evaluation
prompts the record carries. Malformed records raise :class:`MalformedRecordError` naming the
record and the field; nothing is dropped silently.

Where data comes from (``resolve_data_file``), in order: an explicit local path; the directory
in ``$SEQEDIT_DATA_DIR``; the canonical public download (cached under ``$SEQEDIT_CACHE``);
otherwise an error naming both ways to point at a local copy. The dataset names ``counterfact``
and ``zsre`` without a path use the full data when ``$SEQEDIT_DATA_DIR`` is set and otherwise
the sample bundled in ``harness/data/samples`` (see its LICENSE note).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import cache_root
from harness.errors import UserError

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).parent / "samples"
DATA_DIR_ENV = "SEQEDIT_DATA_DIR"
SAMPLE_FILES = {
    "counterfact": SAMPLES_DIR / "counterfact_sample.jsonl",
    "zsre": SAMPLES_DIR / "zsre_sample.jsonl",
}
# file names looked for inside a data directory, most complete first
DATA_DIR_FILES = {
    "counterfact": [
        "counterfact.json",
        "multi_counterfact.json",
        "counterfact/counterfact_easyedit_edit.jsonl.gz",
    ],
    "zsre": ["zsre_mend_eval.json", "zsre/zsre_mend_eval_portability_1037.jsonl", "zsre_mend_eval_portability_1037.jsonl"],
}
# EasyEdit ships CounterFact split in three files that together hold every case id
EASYEDIT_SPLITS = [
    "counterfact/counterfact_easyedit_train.jsonl.gz",
    "counterfact/counterfact_easyedit_val.jsonl.gz",
    "counterfact/counterfact_easyedit_edit.jsonl.gz",
]
DOWNLOAD_URLS = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "multi_counterfact": "https://rome.baulab.info/data/dsets/multi_counterfact.json",
    "zsre": "https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
}


class MalformedRecordError(UserError, ValueError):
    """A record lacks a field, has an empty target, or a prompt without ``{}``."""


class DataSourceError(UserError, FileNotFoundError):
    """No local copy, data directory or download could provide a dataset."""


@dataclass
class EditRequest:
    case_id: int | str
    prompt: str  # template, "{}" marks the subject
    subject: str
    target_new: str
    target_true: str | None
    dataset: str  # "counterfact" | "zsre"
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    # the answer the neighbourhood prompts should keep (CounterFact: the true object,
    # ZsRE: the NQ answer ``loc_ans``)
    neighborhood_target: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    schema: str = ""  # "rome" | "easyedit" | "mend"

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        return cls(**d)


# ---------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike) -> list[dict]:
    """JSON array, JSON Lines, optionally gzipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _require(record: dict, key: str, where: str, kind=str):
    if key not in record or record[key] is None:
        raise MalformedRecordError(f"{where}: missing field '{key}'")
    value = record[key]
    if kind is str and (not isinstance(value, str) or not value.strip()):
        raise MalformedRecordError(f"{where}: field '{key}' is empty or not a string")
    if kind is list and not isinstance(value, list):
        raise MalformedRecordError(f"{where}: field '{key}' must be a list")
    return value


def _check_template(template: str, where: str, key: str) -> None:
    if "{}" not in template:
        raise MalformedRecordError(f"{where}: field '{key}' has no '{{}}' placeholder for the subject")


def _where(dataset: str, i: int, record: dict) -> str:
    cid = record.get("case_id", record.get("id"))
    return f"{dataset} record {i}" + (f" (case_id {cid})" if cid is not None else "")


def _parse_rome_counterfact(i: int, r: dict) -> EditRequest:
    where = _where("counterfact", i, r)
    rw = _require(r, "requested_rewrite", where, dict)
    if not isinstance(rw, dict):
        raise MalformedRecordError(f"{where}: field 'requested_rewrite' must be an object")
    prompt = _require(rw, "prompt", where + " requested_rewrite")
    _check_template(prompt, where, "requested_rewrite.prompt")
    tn = _require(rw, "target_new", where + " requested_rewrite", dict)
    tt = _require(rw, "target_true", where + " requested_rewrite", dict)
    target_new = _require(tn, "str", where + " requested_rewrite.target_new")
    target_true = _require(tt, "str", where + " requested_rewrite.target_true")
    return EditRequest(
        case_id=_require(r, "case_id", where, int),
        prompt=prompt,
        subject=_require(rw, "subject", where + " requested_rewrite"),
        target_new=target_new,
        target_true=target_true,
        dataset="counterfact",
        paraphrase_prompts=list(r.get("paraphrase_prompts", [])),
        neighborhood_prompts=list(r.get("neighborhood_prompts", [])),
        neighborhood_target=target_true,
        generation_prompts=list(r.get("generation_prompts", [])),
        relation_id=rw.get("relation_id"),
        target_new_id=tn.get("id"),
        target_true_id=tt.get("id"),
        schema="rome",
    )


def _parse_easyedit_counterfact(i: int, r: dict) -> EditRequest:
    where = _where("counterfact", i, r)
    prompt_text = _require(r, "prompt", where)
    subject = _require(r, "subject", where)
    if subject not in prompt_text:
        raise MalformedRecordError(f"{where}: field 'subject' ({subject!r}) does not occur in 'prompt'")
    target_new = _require(r, "target_new", where)
    target_true = _require(r, "ground_truth", where)
    neighbors, neighbor_target = [], target_true
    if r.get("locality_prompt"):
        neighbors = [r["locality_prompt"]]
        neighbor_target = _require(r, "locality_ground_truth", where)
    return EditRequest(
        case_id=_require(r, "case_id", where, int),
        prompt=prompt_text.replace(subject, "{}", 1),
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        dataset="counterfact",
        paraphrase_prompts=[r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
        neighborhood_prompts=neighbors,
        neighborhood_target=neighbor_target,
        schema="easyedit",
    )


def parse_counterfact_records(records: list[dict]) -> list[EditRequest]:
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise MalformedRecordError(f"counterfact record {i}: not a JSON object")
        if "requested_rewrite" in r:
            out.append(_parse_rome_counterfact(i, r))
        elif "prompt" in r or "ground_truth" in r or "target_new" in r:
            out.append(_parse_easyedit_counterfact(i, r))
        else:
            raise MalformedRecordError(
                f"{_where('counterfact', i, r)}: missing field 'requested_rewrite' (ROME schema) "
                "or 'prompt' (EasyEdit schema)"
            )
    return out


def parse_zsre_records(records: list[dict], target: str = "answers") -> list[EditRequest]:
    """MEND-schema ZsRE. ``target='answers'`` edits toward ``answers[0]`` (ROME/MEMIT/AlphaEdit/
    LyapLock); ``target='alt'`` toward the alternative answer (EasyEdit)."""
    if target not in ("answers", "alt"):
        raise ValueError(f"zsre target must be 'answers' or 'alt', got {target!r}")
    out = []
    for i, r in enumerate(records):
        where = _where("zsre", i, r)
        if not isinstance(r, dict):
            raise MalformedRecordError(f"{where}: not a JSON object")
        src = _require(r, "src", where)
        subject = _require(r, "subject", where)
        if subject not in src:
            raise MalformedRecordError(f"{where}: field 'subject' ({subject!r}) does not occur in 'src'")
        if target == "answers":
            answers = _require(r, "answers", where, list)
            if not answers or not isinstance(answers[0], str) or not answers[0].strip():
                raise MalformedRecordError(f"{where}: field 'answers' is empty")
            target_new = answers[0]
        else:
            target_new = _require(r, "alt", where)
        loc = _require(r, "loc", where)
        loc_ans = _require(r, "loc_ans", where)
        out.append(
            EditRequest(
                case_id=r.get("case_id", i),
                prompt=src.replace(subject, "{}", 1),
                subject=subject,
                target_new=target_new,
                target_true=None,
                dataset="zsre",
                paraphrase_prompts=[_require(r, "rephrase", where)],
                neighborhood_prompts=[loc + "?"],
                neighborhood_target=loc_ans,
                schema="mend",
            )
        )
    return out


# ---------------------------------------------------------------------------- sources


def _how_to_point() -> str:
    return (
        f"pass a local file with edit_data=/path/to/file.json (or data_path=...), or set "
        f"{DATA_DIR_ENV}=/path/to/data_dir holding one of the known file names"
    )


def resolve_data_file(name: str, path: str | os.PathLike | None = None, download: bool = True) -> list[Path]:
    """Files holding dataset ``name``: explicit path, $SEQEDIT_DATA_DIR, cached/fresh download."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            found = _files_in_dir(name, p)
            if found:
                return found
            raise DataSourceError(f"{p} holds none of {DATA_DIR_FILES[name]}; {_how_to_point()}")
        if not p.exists():
            raise DataSourceError(f"{p} does not exist; {_how_to_point()}")
        return [p]
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        found = _files_in_dir(name, Path(env))
        if found:
            return found
        log.warning("%s=%s holds no %s file (%s)", DATA_DIR_ENV, env, name, DATA_DIR_FILES[name])
    url = DOWNLOAD_URLS.get(name)
    if url and download:
        target = cache_root() / "data" / Path(url).name
        if target.exists():
            return [target]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            log.info("downloading %s", url)
            urllib.request.urlretrieve(url, tmp)
            tmp.replace(target)
            return [target]
        except OSError as exc:
            raise DataSourceError(
                f"could not find {name} locally and the download from {url} failed ({exc}); "
                + _how_to_point()
            ) from exc
    raise DataSourceError(f"no local copy of {name}; {_how_to_point()}")


def _files_in_dir(name: str, d: Path) -> list[Path]:
    if name == "counterfact" and not (d / "counterfact.json").exists() and not (d / "multi_counterfact.json").exists():
        splits = [d / s for s in EASYEDIT_SPLITS]
        if all(s.exists() for s in splits):
            return splits
    for rel in DATA_DIR_FILES[name]:
        if (d / rel).exists():
            return [d / rel]
    return []


def _load(name: str, files: list[Path], limit: int | None, **kw) -> list[EditRequest]:
    records = []
    for f in files:
        records.extend(read_records(f))
    if name == "counterfact":
        if len(files) > 1:  # EasyEdit splits: restore the ROME case order
            records.sort(key=lambda r: r.get("case_id", 0))
        reqs = parse_counterfact_records(records)
    else:
        reqs = parse_zsre_records(records, **kw)
    return reqs[:limit] if limit is not None else reqs


def load_counterfact(path=None, limit: int | None = None, full: bool | None = None) -> list[EditRequest]:
    files = _source("counterfact", path, full)
    return _load("counterfact", files, limit)


def load_zsre(path=None, limit: int | None = None, target: str = "answers", full: bool | None = None) -> list[EditRequest]:
    files = _source("zsre", path, full)
    return _load("zsre", files, limit, target=target)


def _source(name: str, path, full: bool | None) -> list[Path]:
    if path is None and not full and not os.environ.get(DATA_DIR_ENV):
        return [SAMPLE_FILES[name]]
    return resolve_data_file(name, path)


def load_edit_data(spec: str = "counterfact", limit: int | None = None, zsre_target: str = "answers") -> list[EditRequest]:
    """``counterfact`` | ``zsre`` (bundled sample unless $SEQEDIT_DATA_DIR is set),
    ``counterfact:full`` | ``zsre:full`` (local dir, then download), or a file path
    (schema detected; ZsRE if records carry 'src')."""
    name, _, qual = spec.partition(":")
    if name in ("counterfact", "mcf", "cf"):
        reqs = load_counterfact(limit=None, full=qual == "full")
    elif name == "zsre":
        reqs = load_zsre(limit=None, target=zsre_target, full=qual == "full")
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise DataSourceError(
                f"edit_data={spec!r} is neither a dataset name (counterfact, zsre, counterfact:full, "
                f"zsre:full) nor an existing file; {_how_to_point()}"
            )
        records = read_records(p)
        if records and isinstance(records[0], dict) and "src" in records[0]:
            reqs = parse_zsre_records(records, target=zsre_target)
        else:
            reqs = parse_counterfact_records(records)
    if limit is not None and limit > len(reqs):
        raise DataSourceError(
            f"{limit} edits requested but {spec} provides {len(reqs)} records; for the full data "
            + _how_to_point()
        )
    return reqs[:limit] if limit is not None else reqs
