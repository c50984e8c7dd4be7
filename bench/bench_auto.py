#!/usr/bin/env python3
"""auto on real models (issue 7's figures). Prints tables; asserts nothing.

    python bench/bench_auto.py                 # BERT and magika
    python bench/bench_auto.py --bert          # the 3-layer BERT only
    python bench/bench_auto.py --magika [--files 600] [--magika-specs "tie,auto(feedback=true),fold"]
    python bench/bench_auto.py --sweep docs   # the BERT's rate-distortion table and plot (README)

BERT (paraphrase_minilm_l3): 32 English sentences calibrate, 32 others test. The budget applies
to the sentence embedding, output "461" (mean-pooled [B, 384]). Rows: the input, onnxruntime's
MatMulNBits 4-bit block 32, onnxruntime's quantize_dynamic int8, NNCF's compress_weights (int4
group 32 calibrated on the calibration sentences, int8) where nncf imports, and auto at min
cosine 0.99 and 0.999 (with and without error feedback). Cosine figures are the worse of
onnxruntime's two optimisation levels, on the test sentences and on the calibration ones.

magika: files from this machine (/usr/lib, /usr/share, /etc), featurised exactly as magika
1.0.3 does (see `magika_features`); 256 files calibrate, the rest (>= 500) test. Rows: auto at
decreasing budgets on the output probabilities (min cosine, and atol, which bounds how far
any class probability moves and so which files can flip), with the test set's top-1 agreement
with the original model; the smallest model that keeps >= 99.5% agreement is the answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import graphpass
from graphpass import sweep
from graphpass.verify import Budget, verify

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins
from fixtures import real_models  # noqa: E402

EMBEDDING = "461"


# ---------------------------------------------------------------------------------------------
# WordPiece (bert-base-uncased), stdlib only
# ---------------------------------------------------------------------------------------------


class WordPiece:
    """BertNormalizer(lowercase, strip accents, CJK split) + BertPreTokenizer + WordPiece."""

    def __init__(self, tokenizer_json: Path):
        model = json.loads(Path(tokenizer_json).read_text())["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.prefix = model["continuing_subword_prefix"]
        self.max_chars = model["max_input_chars_per_word"]

    def normalize(self, text: str) -> str:
        out = []
        for ch in unicodedata.normalize("NFD", text.lower()):
            cat = unicodedata.category(ch)
            if cat == "Mn" or ch == "\ufffd" or (cat.startswith("C") and ch not in "\t\n\r"):
                continue  # accents and control characters go
            if 0x4E00 <= ord(ch) <= 0x9FFF:
                out.append(f" {ch} ")
            else:
                out.append(" " if ch.isspace() else ch)
        return "".join(out)

    @staticmethod
    def _is_punctuation(ch: str) -> bool:
        code = ord(ch)
        return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or \
            unicodedata.category(ch).startswith("P")

    def words(self, text: str) -> list[str]:
        words = []
        for chunk in self.normalize(text).split():
            current = ""
            for ch in chunk:
                if self._is_punctuation(ch):
                    words += [current, ch] if current else [ch]
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def word_ids(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = (self.prefix if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode_batch(self, sentences: list[str], max_len: int = 128) -> dict[str, np.ndarray]:
        rows = [[self.vocab["[CLS]"]] + [i for w in self.words(s) for i in self.word_ids(w)][: max_len - 2]
                + [self.vocab["[SEP]"]] for s in sentences]
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}


CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "She finished the marathon in just under four hours.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The museum will reopen next spring after extensive renovations.",
    "Can you recommend a good Italian restaurant nearby?",
    "The software update fixed several security vulnerabilities.",
    "Children were building sandcastles on the beach all afternoon.",
    "The committee postponed its decision until further evidence is available.",
    "Heavy rain caused flooding in several low-lying neighborhoods.",
    "He learned to play the piano when he was seven years old.",
    "The new smartphone has a larger battery and a better camera.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please remember to lock the door when you leave.",
    "The train to Boston departs from platform nine at noon.",
    "Our team won the championship after a dramatic overtime goal.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Global temperatures have risen steadily over the past century.",
    "The author signed copies of her latest novel at the bookstore.",
    "A cat is sleeping on the windowsill in the warm sunlight.",
    "The company reported record profits in the third quarter.",
    "Volunteers planted hundreds of trees along the river bank.",
    "I can't find my keys anywhere; have you seen them?",
    "The orchestra performed Beethoven's Ninth Symphony to a full house.",
    "Doctors recommend at least seven hours of sleep each night.",
    "The bridge was closed for repairs after the earthquake.",
    "Students must submit their essays before Friday at midnight.",
    "The spacecraft successfully entered orbit around Mars.",
    "Fresh vegetables are sold at the farmers market every Saturday.",
    "The detective finally solved the mystery of the missing painting.",
    "Learning a new language takes patience and daily practice.",
]

TEST_SENTENCES = [
    "A woman is slicing onions in the kitchen.",
    "The stock market fell sharply after the announcement.",
    "He forgot his umbrella and got soaked on the way home.",
    "Astronomers observed a distant galaxy forming new stars.",
    "The library extended its opening hours during exam season.",
    "Two dogs are chasing a ball across the park.",
    "The government announced new measures to reduce air pollution.",
    "She plays the violin in the city's youth orchestra.",
    "The hotel offers free breakfast and airport shuttle service.",
    "Engineers are testing a prototype of the electric aircraft.",
    "My grandmother bakes the best apple pie in town.",
    "The football match was cancelled because of the storm.",
    "Researchers published a study on the effects of caffeine on memory.",
    "The city council approved the budget for the new school.",
    "A young boy is riding his bicycle down the hill.",
    "The concert tickets sold out within minutes.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The painter used bright colors to capture the sunset.",
    "Online shopping has changed how people buy groceries.",
    "The pilot announced that the flight would land early.",
    "Our neighbors adopted a puppy from the animal shelter.",
    "The professor explained the theory with simple examples.",
    "Traffic was backed up for miles because of an accident.",
    "The startup raised ten million dollars in its first funding round.",
    "Bees play an essential role in pollinating crops.",
    "He wrote a letter to thank his teacher for her support.",
    "The film won three awards at the international festival.",
    "Snow covered the mountains for most of the winter.",
    "The nurse checked the patient's blood pressure every hour.",
    "They are planning a road trip across the country next summer.",
    "The ancient castle attracts thousands of tourists each year.",
    "Why is the sky blue during the day and red at sunset?",
]


# ---------------------------------------------------------------------------------------------
# magika's features, as magika 1.0.3 builds them (magika/magika.py, config.min.json of
# standard_v3_3: beg_size=end_size=1024, mid_size=0, block_size=4096, padding_token=256,
# min_file_size_for_dl=8)
# ---------------------------------------------------------------------------------------------

MAGIKA_BLOCK, MAGIKA_BEG, MAGIKA_END, MAGIKA_PAD, MAGIKA_MIN_SIZE = 4096, 1024, 1024, 256, 8


def magika_features(data: bytes) -> np.ndarray | None:
    """int32[2048]: the first 4096 bytes lstripped, first 1024 kept, padded after; the last 4096
    bytes rstripped, last 1024 kept, padded before. None where magika does not run its model
    (under 8 bytes, or fewer than 8 bytes left once stripped)."""
    if len(data) < MAGIKA_MIN_SIZE:
        return None
    block = min(MAGIKA_BLOCK, len(data))
    beg = list(data[:block].lstrip()[:MAGIKA_BEG])
    beg += [MAGIKA_PAD] * (MAGIKA_BEG - len(beg))
    end_bytes = data[len(data) - block:].rstrip()
    end = list(end_bytes[max(0, len(end_bytes) - MAGIKA_END):])
    end = [MAGIKA_PAD] * (MAGIKA_END - len(end)) + end
    if beg[MAGIKA_MIN_SIZE - 1] == MAGIKA_PAD:
        return None
    return np.array(beg + end, dtype=np.int32)


def machine_files(count: int, roots=("/usr/lib", "/usr/share", "/etc"), seed: int = 0) -> list[Path]:
    """Regular readable files under `roots`, a deterministic spread over folders and types."""
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    found.append(path)
    rng = np.random.default_rng(seed)
    rng.shuffle(found)
    chosen, suffixes = [], {}
    for path in found:  # at most 40 files of one suffix, so .py or .so do not fill the set
        suffix = path.suffix.lower()
        if suffixes.get(suffix, 0) >= 40:
            continue
        try:
            features = magika_features(path.read_bytes()[:1 << 22])
        except OSError:
            continue
        if features is not None:
            suffixes[suffix] = suffixes.get(suffix, 0) + 1
            chosen.append((path, features))
        if len(chosen) >= count:
            break
    return chosen


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    file_bytes: int
    test: float | None  # cosine on the test inputs (BERT) or top-1 agreement (magika)
    calibration: float | None
    seconds: float | None = None
    passed: bool | None = None


def worst_cosine(reference, candidate, feeds, output: str) -> float:
    checked = verify(reference, candidate, feeds, Budget())
    return checked.outputs[output].cosine


def run_auto(model: Path, spec: str, calibration, budget: Budget, output: str | None):
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "auto.onnx"
        try:
            result = graphpass.run(model, spec, output=target, inputs=calibration, budget=budget,
                                   budget_outputs=[output] if output else None, progress=_progress)
        except graphpass.errors.GraphpassError as exc:
            print(f"  {spec} at {budget.describe()}: {exc}", file=sys.stderr)
            return None, None, time.perf_counter() - start
        data = target.read_bytes()
    return data, result, time.perf_counter() - start


class _progress:
    """Prints each auto stage once, to show where the time goes."""

    def __init__(self, label, total):
        self.label, self.started = label, time.perf_counter()

    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc):
        print(f"    {self.label}: {time.perf_counter() - self.started:.1f}s", file=sys.stderr)


def auto_passes(result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "auto")


def quantized_baselines(model_path: Path, calibration) -> list[tuple[str, bytes]]:
    """onnxruntime's baselines, and NNCF's where it imports (calibrated where they calibrate)."""
    proto = onnx.load(model_path)
    return [(name, build(proto, calibration)) for name, _, build in sweep.available_baselines()]


def render(title: str, rows: list[Row], input_bytes: int, metric: str) -> str:
    header = f"{'model':<58} {'file':>10} {'of input':>8} {metric + ' test':>13} {metric + ' calib':>14} {'time':>7}"
    lines = [title, header, "-" * len(header)]
    for row in rows:
        test = "-" if row.test is None else f"{row.test:.6f}" if metric == "cosine" else f"{100 * row.test:.2f}%"
        calib = "-" if row.calibration is None else f"{row.calibration:.6f}" if metric == "cosine" \
            else f"{100 * row.calibration:.2f}%"
        seconds = "-" if row.seconds is None else f"{row.seconds:.0f}s"
        lines.append(f"{row.label:<58} {row.file_bytes / 1e6:>8.2f}MB {row.file_bytes / input_bytes:>8.1%} "
                     f"{test:>13} {calib:>14} {seconds:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------


def bench_bert(specs: list[str], budgets: list[float]) -> str:
    path = Path(real_models.fetch("paraphrase_minilm_l3"))
    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    calibration = tokenizer.encode_batch(CALIBRATION_SENTENCES)
    test = tokenizer.encode_batch(TEST_SENTENCES)
    input_bytes = path.stat().st_size
    rows = [Row("(input) paraphrase-MiniLM-L3-v2", input_bytes, 1.0, 1.0)]
    for label, data in quantized_baselines(path, calibration):
        rows.append(Row(label, len(data), worst_cosine(path, data, test, EMBEDDING),
                        worst_cosine(path, data, calibration, EMBEDDING)))
    details = []
    for min_cosine in budgets:
        for spec in specs:
            data, result, seconds = run_auto(path, spec, calibration, Budget(min_cosine=min_cosine), EMBEDDING)
            label = f"{spec} @ min cosine {min_cosine}"
            if data is None:
                rows.append(Row(label + " (failed)", 0, None, None, seconds))
                continue
            rows.append(Row(label, len(data), worst_cosine(path, data, test, EMBEDDING),
                            worst_cosine(path, data, calibration, EMBEDDING), seconds))
            details.append((label, auto_passes(result)["details"]))
    text = render("paraphrase-MiniLM-L3-v2: budget on output 461 (sentence embedding), 32 calibration / "
                  "32 test sentences", rows, input_bytes, "cosine")
    return text + "\n\n" + "\n\n".join(render_choices(label, d) for label, d in details)


def render_choices(label: str, details: dict) -> str:
    lines = [f"{label}: predicted units {details['predicted']['units']:.3f}, measured {details['measured']['units']:.3f}; "
             f"{details['settings_measured']} settings measured; seconds {details['seconds']}; "
             f"rounds {[(r['predicted_units'], r['measured_units'], r['passed']) for r in details['rounds']]}"]
    for t in details["tensors"]:
        lines.append(f"  {t['name'][-48:]:<48} {str(t['shape']):<14} {t['setting']:<52} "
                     f"{t['bytes_before']:>9} -> {t['bytes_after']:>8}  {100 * t['error_units']:6.2f}% of budget")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# magika
# ---------------------------------------------------------------------------------------------


def top1(model, features: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"bytes": features})[0].argmax(axis=1)


def parse_budget(text: str) -> Budget:
    """"0.999" (min cosine) or "atol=0.01"."""
    name, _, value = text.rpartition("=")
    return Budget(atol=float(value)) if name == "atol" else Budget(min_cosine=float(value))


def bench_magika(files: int, specs: list[str], budgets: list[Budget]) -> str:
    path = Path(real_models.fetch("magika"))
    found = machine_files(files + 256)
    features = np.stack([f for _, f in found])
    calibration, test = features[:256], features[256:]
    reference_test, reference_calibration = top1(path, test), top1(path, calibration)
    input_bytes = path.stat().st_size
    rows = [Row(f"(input) magika standard_v3_3, {len(test)} test files", input_bytes, 1.0, 1.0)]
    details = []
    for budget in budgets:
        for spec in specs:
            data, result, seconds = run_auto(path, spec, {"bytes": calibration}, budget, None)
            label = f"{spec} @ {budget.describe()}"
            if data is None:
                rows.append(Row(label + " (failed)", 0, None, None, seconds))
                continue
            rows.append(Row(label, len(data), float(np.mean(top1(data, test) == reference_test)),
                            float(np.mean(top1(data, calibration) == reference_calibration)), seconds))
            details.append((label, auto_passes(result)["details"]))
    good = [r for r in rows[1:] if r.test is not None and r.test >= 0.995]
    verdict = (f"smallest with >= 99.5% top-1 agreement on the test files: {min(good, key=lambda r: r.file_bytes).label}"
               if good else "no auto model kept >= 99.5% top-1 agreement")
    kinds = sorted({p.suffix or "(none)" for p, _ in found})
    text = render(f"magika: {len(found)} files of this machine ({len(kinds)} suffixes), 256 calibrate, "
                  f"{len(test)} test; top-1 agreement with the original", rows, input_bytes, "top-1")
    return text + "\n" + verdict + "\n\n" + "\n\n".join(render_choices(label, d) for label, d in details)


def sweep_bert(folder: Path, methods: list[str], bits: list[int], granularities: list[str]) -> str:
    """`graphpass sweep` of the BERT, with and without error feedback: fitted on the calibration
    sentences, measured on the test ones (worst sentence). The table and plot the README shows."""
    path = Path(real_models.fetch("paraphrase_minilm_l3"))
    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    rows = sweep.sweep(path, methods, bits, granularities, inputs=tokenizer.encode_batch(TEST_SENTENCES),
                       calibration=tokenizer.encode_batch(CALIBRATION_SENTENCES), feedback=True,
                       outputs=[EMBEDDING], progress=_progress)
    folder.mkdir(parents=True, exist_ok=True)
    sweep.write_table(rows, folder / "bert_sweep.csv")
    sweep.write_svg(rows, folder / "bert_sweep.svg",
                    "paraphrase-MiniLM-L3-v2: file size against the worst test sentence's embedding error")
    return sweep.render_text(rows) + f"\nwrote {folder / 'bert_sweep.csv'} and {folder / 'bert_sweep.svg'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bert", action="store_true")
    parser.add_argument("--magika", action="store_true")
    parser.add_argument("--files", type=int, default=600, help="magika test files (plus 256 calibration)")
    parser.add_argument("--specs", default="tie,auto,fold;tie,auto(feedback=true),fold",
                        help="BERT pass specs, ;-separated")
    parser.add_argument("--budgets", default="0.99,0.999")
    parser.add_argument("--magika-specs", default="tie,auto,fold", help="magika pass specs, ;-separated")
    parser.add_argument("--magika-budgets", default="0.999,0.9999,atol=0.05,atol=0.02,atol=0.01",
                        help="min cosines, or atol=X on the output probabilities")
    parser.add_argument("--sweep", type=Path, metavar="DIR",
                        help="instead: sweep the BERT, with and without error feedback, into DIR")
    parser.add_argument("--sweep-methods", default="kmeans,uniform,codebook")
    parser.add_argument("--sweep-bits", default="2..8")
    parser.add_argument("--sweep-granularities", default="tensor,channel,group")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # onnxruntime's quantizers log each node they skip
    if args.sweep:
        print(sweep_bert(args.sweep, sweep.parse_methods(args.sweep_methods), sweep.parse_bits(args.sweep_bits),
                         sweep.parse_list(args.sweep_granularities)))
        return 0
    both = not (args.bert or args.magika)
    if args.bert or both:
        print(bench_bert(args.specs.split(";"), [float(b) for b in args.budgets.split(",")]), flush=True)
        print()
    if args.magika or both:
        print(bench_magika(args.files, args.magika_specs.split(";"), [parse_budget(b) for b in args.magika_budgets.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
