"""A copy of the bundled SmolLM2 GGUF cut to what capturing one layer of some collections needs.

python benchmarks/trim_gguf.py OUT_DIR ../shared/datasets/msmarco-5k ../shared/datasets/cranfield [--layer 8] [--gzip]

Keeps the token embedding and blocks 0 .. LAYER (a capture at LAYER reads the residual stream after
blocks 0 .. LAYER-1; one block more keeps it from being the model's last hidden state, which
transformers returns after the final norm), and zeroes the embedding rows of tokens that the collections' passages and
queries never feed (split, prefixed and tokenised as `ragsae bench` does), so the file compresses:
98 MB -> 33 MB gzipped for layer 8 and the two shared collections. For moving the model to a machine
that takes small uploads (the GPU benchmark figures in benchmarks/README.md were measured with it).
The copy cannot generate text. Before writing, it checks that a sample of each collection's passages
and queries gives bit-identical activations at LAYER with the copy and with the full model.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

from ragsae.bench import load_beir
from ragsae.capture import capture, tokenize
from ragsae.config import CaptureConfig, LlmConfig
from ragsae.lm.loading import DEFAULT_GGUF_FILE, default_gguf_folder, load_llm
from ragsae.text import split_passages


def fed_texts(dataset: str, tokenizer, cap: CaptureConfig) -> list[tuple[list[str], str]]:
    """(texts, prefix) pairs the bench feeds for this collection: passages, then queries."""
    documents, queries, _ = load_beir(dataset, "test")
    passages = split_passages(documents, tokenizer, cap.window, cap.overlap)
    return [([p.text for p in passages], cap.passage_prefix), (list(queries.values()), cap.query_prefix)]


def write_trimmed(source: Path, target: Path, blocks: int, kept_tokens: set[int]) -> None:
    """Copy `source` with `blocks` transformer blocks and only `kept_tokens`' embedding rows."""
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = blocks if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    kept_data = []
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= blocks:
            continue
        data = np.array(tensor.data)
        if tensor.name == "token_embd.weight":  # rows are tokens, in the quantised block layout
            unused = np.ones(data.shape[0], dtype=bool)
            unused[sorted(kept_tokens)] = False
            data[unused] = 0
        kept_data.append(data)
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in kept_data:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", metavar="OUT_DIR")
    parser.add_argument("datasets", nargs="+", help="BEIR-layout folders whose tokens are kept")
    parser.add_argument("--layer", type=int, default=CaptureConfig().layer, help="capture layer (default: 8)")
    parser.add_argument("--gzip", action="store_true", help="also write OUTPUT.gguf.gz and drop the .gguf")
    parser.add_argument("--sample", type=int, default=40, help="passages and queries checked per collection")
    args = parser.parse_args(argv)

    cap = CaptureConfig()
    full = load_llm(LlmConfig(device="cpu"))
    feeds = [feed for dataset in args.datasets for feed in fed_texts(dataset, full.tokenizer, cap)]
    kept = set(full.tokenizer.all_special_ids)
    for texts, prefix in feeds:
        kept.update(token for ids in tokenize(full, texts, cap.window, prefix)[0] for token in ids)
    name = f"{Path(DEFAULT_GGUF_FILE).stem.split('.')[0].lower()}-blocks0-{args.layer}.gguf"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        write_trimmed(default_gguf_folder() / DEFAULT_GGUF_FILE, Path(tmp) / name, args.layer + 1, kept)
        trimmed = load_llm(LlmConfig(model=tmp, gguf_file=name, device="cpu"), cache=False)  # a throwaway file
        for texts, prefix in feeds:
            sample = texts[:: max(1, len(texts) // args.sample)]
            a = capture(full, sample, [args.layer], cap.window, cap.batch_size, prefix)[args.layer].values
            b = capture(trimmed, sample, [args.layer], cap.window, cap.batch_size, prefix)[args.layer].values
            if not np.array_equal(a, b):
                raise SystemExit("trimmed model's activations differ from the full model's: not written")
        print(f"{len(kept)} token rows kept; activations at layer {args.layer} identical on the samples")
        target = out / name
        if args.gzip:
            with open(Path(tmp) / name, "rb") as src, gzip.open(f"{target}.gz.tmp", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            Path(f"{target}.gz.tmp").replace(f"{target}.gz")
            target = Path(f"{target}.gz")
        else:
            (Path(tmp) / name).replace(target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
