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
    source: str = ""  # "file:line" the record was read from (for error messages)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict:
        return asdict(self)

    def texts(self) -> dict[str, str]:
        """Every text the editor or a metric puts through the model, by field name."""
        out = {"prompt + target_new": f"{self.rewrite_prompt} {self.target_new}"}
        if self.target_true:
            out["prompt + target_true"] = f"{self.rewrite_prompt} {self.target_true}"
        for key in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            for j, text in enumerate(getattr(self, key)):
                out[f"{key}[{j}]"] = text
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        return cls(**d)


# ---------------------------------------------------------------------------- reading


# Longest text accepted in any field at load time. The model's context (in tokens) is the real
# bound and is checked once a tokenizer is at hand; this one keeps a stray multi-megabyte field
# from being tokenised and padded into a batch at all.
MAX_TEXT_CHARS = 4096


def read_located(path: str | os.PathLike) -> list[tuple[str, object]]:
    """The records of a JSON array or JSON Lines file (optionally gzipped), each with where it
    starts (``file:line``). Bytes that are not UTF-8 and text that is not JSON are errors naming
    the file and line."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise MalformedRecordError(f"{path}: cannot be read ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise MalformedRecordError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("["):
        return _located_array(path, text)
    located = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MalformedRecordError(
                f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); a JSON Lines "
                "file holds one record per line") from None
        located.append((f"{path}:{number}", value))
    return located


def _located_array(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedRecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    decoder = json.JSONDecoder()
    located, pos, line, counted = [], text.index("[") + 1, 1, 0
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return located
        line += text.count("\n", counted, pos)
        counted = pos
        value, pos = decoder.raw_decode(text, pos)
        located.append((f"{path}:{line}", value))


def read_records(path: str | os.PathLike) -> list:
    """JSON array, JSON Lines, optionally gzipped (the values; see :func:`read_located`)."""
    return [value for _, value in read_located(path)]


def _where(dataset: str, i: int, record, location: str | None = None) -> str:
    cid = record.get("case_id", record.get("id")) if isinstance(record, dict) else None
    text = f"{dataset} record {i}" + (f" (case_id {cid!r})" if cid is not None else "")
    return f"{location}: {text}" if location else text


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise MalformedRecordError(f"{where}: field '{key}' must be a string, got {_kind(value)}")
    if not value.strip():
        raise MalformedRecordError(f"{where}: field '{key}' is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise MalformedRecordError(
            f"{where}: field '{key}' is {len(value)} characters long; at most {MAX_TEXT_CHARS} are accepted")
    return value


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)


def _require(record: dict, key: str, where: str, kind=str):
    if key not in record or record[key] is None:
        raise MalformedRecordError(f"{where}: missing field '{key}'")
    value = record[key]
    if kind is str:
        return _text(value, where, key)
    if kind is list and not isinstance(value, list):
        raise MalformedRecordError(f"{where}: field '{key}' must be a list, got {_kind(value)}")
    if kind is dict and not isinstance(value, dict):
        raise MalformedRecordError(f"{where}: field '{key}' must be an object, got {_kind(value)}")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise MalformedRecordError(f"{where}: field '{key}' must be a whole number, got {_kind(value)}")
    return value


def _optional_text(record: dict, key: str, where: str) -> str | None:
    value = record.get(key)
    return None if value is None or value == "" else _text(value, where, key)


def _text_list(record: dict, key: str, where: str) -> list[str]:
    """A list of prompts (absent: empty). A string here would be split into characters."""
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedRecordError(f"{where}: field '{key}' must be a list of strings, got {_kind(value)}")
    return [_text(v, where, f"{key}[{j}]") for j, v in enumerate(value)]


def _check_template(template: str, where: str, key: str) -> None:
    if template.count("{}") != 1:
        raise MalformedRecordError(
            f"{where}: field '{key}' must hold exactly one '{{}}' placeholder for the subject, "
            f"has {template.count('{}')}")
    if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        raise MalformedRecordError(
            f"{where}: field '{key}' holds a '{{' or '}}' that is not the subject placeholder '{{}}'")


def _parse_rome_counterfact(i: int, r: dict, where: str) -> EditRequest:
    rw = _require(r, "requested_rewrite", where, dict)
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
        paraphrase_prompts=_text_list(r, "paraphrase_prompts", where),
        neighborhood_prompts=_text_list(r, "neighborhood_prompts", where),
        neighborhood_target=target_true,
        generation_prompts=_text_list(r, "generation_prompts", where),
        relation_id=_optional_text(rw, "relation_id", where),
        target_new_id=_optional_text(tn, "id", where + " requested_rewrite.target_new"),
        target_true_id=_optional_text(tt, "id", where + " requested_rewrite.target_true"),
        schema="rome",
    )


def _parse_easyedit_counterfact(i: int, r: dict, where: str) -> EditRequest:
    prompt_text = _require(r, "prompt", where)
    subject = _require(r, "subject", where)
    if subject not in prompt_text:
        raise MalformedRecordError(f"{where}: field 'subject' ({subject!r}) does not occur in 'prompt'")
    template = prompt_text.replace(subject, "{}", 1)
    _check_template(template, where, "prompt")
    target_new = _require(r, "target_new", where)
    target_true = _require(r, "ground_truth", where)
    neighbors, neighbor_target = [], target_true
    locality = _optional_text(r, "locality_prompt", where)
    if locality:
        neighbors = [locality]
        neighbor_target = _require(r, "locality_ground_truth", where)
    rephrase = _optional_text(r, "rephrase_prompt", where)
    return EditRequest(
        case_id=_require(r, "case_id", where, int),
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        dataset="counterfact",
        paraphrase_prompts=[rephrase] if rephrase else [],
        neighborhood_prompts=neighbors,
        neighborhood_target=neighbor_target,
        schema="easyedit",
    )


def parse_counterfact_records(records: list, locations: list[str] | None = None) -> list[EditRequest]:
    """ROME- or EasyEdit-schema CounterFact records; ``locations`` (``file:line`` per record) go
    into every error message."""
    out = []
    for i, r in enumerate(records):
        where = _where("counterfact", i, r, locations[i] if locations else None)
        if not isinstance(r, dict):
            raise MalformedRecordError(f"{where}: a record must be a JSON object, got {_kind(r)}")
        if "requested_rewrite" in r:
            out.append(_parse_rome_counterfact(i, r, where))
        elif "prompt" in r or "ground_truth" in r or "target_new" in r:
            out.append(_parse_easyedit_counterfact(i, r, where))
        else:
            raise MalformedRecordError(
                f"{where}: missing field 'requested_rewrite' (ROME schema) or 'prompt' (EasyEdit schema)")
        out[-1].source = locations[i] if locations else ""
    _check_unique_ids(out, "counterfact", locations)
    return out


def parse_zsre_records(records: list, target: str = "answers", locations: list[str] | None = None) -> list[EditRequest]:
    """MEND-schema ZsRE. ``target='answers'`` edits toward ``answers[0]`` (ROME/MEMIT/AlphaEdit/
    LyapLock); ``target='alt'`` toward the alternative answer (EasyEdit)."""
    if target not in ("answers", "alt"):
        raise ValueError(f"zsre target must be 'answers' or 'alt', got {target!r}")
    out = []
    for i, r in enumerate(records):
        where = _where("zsre", i, r, locations[i] if locations else None)
        if not isinstance(r, dict):
            raise MalformedRecordError(f"{where}: a record must be a JSON object, got {_kind(r)}")
        src = _require(r, "src", where)
        subject = _require(r, "subject", where)
        if subject not in src:
            raise MalformedRecordError(f"{where}: field 'subject' ({subject!r}) does not occur in 'src'")
        template = src.replace(subject, "{}", 1)
        _check_template(template, where, "src")
        if target == "answers":
            answers = _require(r, "answers", where, list)
            if not answers:
                raise MalformedRecordError(f"{where}: field 'answers' is empty")
            target_new = _text(answers[0], where, "answers[0]")
        else:
            target_new = _require(r, "alt", where)
        loc = _require(r, "loc", where)
        loc_ans = _require(r, "loc_ans", where)
        case_id = r.get("case_id", i)
        if not isinstance(case_id, (int, str)) or isinstance(case_id, bool):
            raise MalformedRecordError(f"{where}: field 'case_id' must be a number or a string, got {_kind(case_id)}")
        out.append(
            EditRequest(
                case_id=case_id,
                prompt=template,
                subject=subject,
                target_new=target_new,
                target_true=None,
                dataset="zsre",
                paraphrase_prompts=[_require(r, "rephrase", where)],
                neighborhood_prompts=[loc + "?"],
                neighborhood_target=loc_ans,
                schema="mend",
                source=locations[i] if locations else "",
            )
        )
    _check_unique_ids(out, "zsre", locations)
    return out


def _check_unique_ids(requests: list[EditRequest], dataset: str, locations: list[str] | None) -> None:
    """A run resumes by case_id: two records with one id would resume onto the wrong one."""
    first: dict = {}
    for i, req in enumerate(requests):
        if req.case_id in first:
            j = first[req.case_id]
            at = (lambda k: locations[k]) if locations else (lambda k: f"record {k}")
            raise MalformedRecordError(
                f"{at(i)}: {dataset} record {i} repeats case_id {req.case_id!r} of {at(j)}; "
                "case ids must be unique (a resumed run finds its edits by them)")
        first[req.case_id] = i


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
    located = []
    for f in files:
        located.extend(read_located(f))
    if name == "counterfact":
        if len(files) > 1:  # EasyEdit splits: restore the ROME case order
            located.sort(key=lambda item: item[1].get("case_id", 0) if isinstance(item[1], dict) else 0)
        reqs = parse_counterfact_records([v for _, v in located], locations=[w for w, _ in located])
    else:
        reqs = parse_zsre_records([v for _, v in located], locations=[w for w, _ in located], **kw)
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


# Named streams read from $SEQEDIT_DATA_DIR, in their order: EasyEdit's 10,000-record CounterFact
# edit split (the papers' long sequential runs), and every ZsRE record available offline (the
# 1,037 eval records, then the 1,000 train records: case ids 0-2036)
NAMED_STREAMS = {
    "counterfact:edit": ("counterfact", ["counterfact/counterfact_easyedit_edit.jsonl.gz"],
                         "EasyEdit's 10,000-record edit split"),
    "zsre:all": ("zsre", ["zsre/zsre_mend_eval_portability_1037.jsonl", "zsre/zsre_mend_train_1k.jsonl"],
                 "the 1,037 ZsRE eval records followed by the 1,000 train records"),
}


def _named_stream_files(spec: str) -> list[Path]:
    _, relatives, what = NAMED_STREAMS[spec]
    env = os.environ.get(DATA_DIR_ENV)
    paths = [Path(env).expanduser() / r for r in relatives] if env else []
    if not env or not all(p.exists() for p in paths):
        raise DataSourceError(
            f"edit_data={spec} reads {', '.join(relatives)} ({what}) under ${DATA_DIR_ENV}"
            + (f", which is not in {env}" if env else ", which is not set")
            + "; set it to the directory that holds them, or pass a file as edit_data")
    return paths


def load_edit_data(spec: str = "counterfact", limit: int | None = None, zsre_target: str = "answers") -> list[EditRequest]:
    """``counterfact`` | ``zsre`` (bundled sample unless $SEQEDIT_DATA_DIR is set),
    ``counterfact:full`` | ``zsre:full`` (local dir, then download), ``counterfact:edit`` |
    ``zsre:all`` (``NAMED_STREAMS``, from $SEQEDIT_DATA_DIR), or a file path
    (schema detected; ZsRE if records carry 'src')."""
    name, _, qual = spec.partition(":")
    if spec in NAMED_STREAMS:
        kind = NAMED_STREAMS[spec][0]
        options = {"target": zsre_target} if kind == "zsre" else {}
        reqs = _load(kind, _named_stream_files(spec), None, **options)
    elif name in ("counterfact", "mcf", "cf"):
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
        if p.is_dir():
            raise DataSourceError(f"edit_data={spec!r} is a directory; pass a file, or set {DATA_DIR_ENV}={p} "
                                  "and use edit_data=counterfact or zsre")
        located = read_located(p)
        if not located:
            raise MalformedRecordError(f"{p}: holds no records")
        records, locations = [v for _, v in located], [w for w, _ in located]
        if isinstance(records[0], dict) and "src" in records[0]:
            reqs = parse_zsre_records(records, target=zsre_target, locations=locations)
        else:
            reqs = parse_counterfact_records(records, locations=locations)
    if limit is not None and limit > len(reqs):
        raise DataSourceError(
            f"{limit} edits requested but {spec} provides {len(reqs)} records; for the full data "
            + _how_to_point()
        )
    return reqs[:limit] if limit is not None else reqs
