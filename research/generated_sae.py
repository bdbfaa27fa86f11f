"""An SAE trained without the evaluated collection's text: on text the LLM writes itself over a wide,
fixed spread of topics, plus another collection's passages; used frozen, or adapted on the collection.

python research/generated_sae.py DATASET_DIR --other OTHER_DATASET_DIR [--gen-tokens 300000]
    [--adapt-steps 300] [--cache-dir benchmarks/.cache] [--output-dir benchmarks/results]

ragsae trains its SAE on the indexed corpus's own activations (about 4e5 tokens on msmarco-5k);
public SAEs see 1e8 to 1e9 tokens of generic text. With no generic corpus offline, the LLM writes one:

1. Generation. Every topic of TOPICS (science, history, geography, medicine, law, technology, sport,
   arts, everyday life, engineering, aeronautics, finance, ...) crossed with every form of FORMS
   ("Write an encyclopedia paragraph about X.", ...), in a seeded order, each prompt sent through the
   tokenizer's chat template and sampled (temperature 0.8, top-p 0.95 among the 1024 most likely
   tokens: `NucleusSampler`; at most 200 new tokens) in left-padded batches of 16, in the model's own
   dtype (bfloat16 where the CPU has it); the whole list again, with new samples, until
   `--gen-tokens` new tokens exist. A text ends at its first special token (end of turn, a new turn);
   empty texts are dropped. Texts are kept in CACHE_DIR/generated/<key>.jsonl (key: the model's
   activation key, the prompts, seed, token budget and sampling settings) with the generation's
   seconds and tokens/s beside it in <key>.json, so a rerun generates nothing; an interrupted
   generation resumes from <key>.partial.json (each batch has its own seed, so resuming changes no text).
2. Capture. Generated texts are split into passages as a collection's documents are and captured like
   passages (`timed_capture`: default window, "Document: " prefix, layer 8, the bench activation
   cache); the `--other` collection's passages come from its default build (cached after a bench run).
3. The generic SAE (default `SaeConfig`, default epochs) trains on generated and other-collection
   passages together, in one seeded shuffled order of passages (the SAE's input normalisation is fit
   on the first 100k tokens, which should be of both sources). It is cached as `cached_sae` caches any
   SAE, keyed by these texts, so it is trained once and never stands in for a collection's own SAE.
   The evaluated collection's text is never in its training data. With `--gen-only`, an SAE trained on
   the generated passages alone is cached and scored too.
4. Rows, all scored on DATASET_DIR with the default build's sparse scoring (`sparse_metrics`): the
   collection's own SAE (the baseline); the other collection's own SAE; the generic SAE frozen; the
   generic SAE adapted on the collection's passage activations (`train_sae(start_from=generic)`, a
   config of one epoch over `--adapt-steps` x 1024 sampled tokens, so exactly that many steps, with
   the default learning rate, warm-up and cosine decay restarted; not cached); and, with --gen-only,
   the generated-text SAE frozen. Columns: FVU, dead fraction and latents per passage on the
   collection's passages (first 100k tokens, `evaluate_sae`), the distinct activation rows each SAE
   trained on, how many of them are the collection's own, and its optimiser steps.

Aeronautics and the web-question forms are in the hand-written topic and form lists because they are
among the subjects of any broad spread, not because of the shared collections: no topic is read from
a collection. Writes OUTPUT_DIR/<collection>-explore-generated-sae.json (rows, generation record,
machine, git commit, command line, seconds) and a Markdown table beside it, as `explore.py` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # explore.py beside this script (not a package)

from explore import (  # noqa: E402
    FVU_ROWS,
    Collection,
    Setup,
    load_collection,
    make_setup,
    markdown_table,
    print_study,
    sae_row,
    study_record,
    study_stem,
    write_study,
)

from ragsae.bench import cached_sae, timed_capture  # noqa: E402
from ragsae.capture import ActivationCache, TokenActivations  # noqa: E402
from ragsae.config import BuildConfig, SaeConfig, to_dict  # noqa: E402
from ragsae.lm import LoadedLlm  # noqa: E402
from ragsae.provenance import git_commit  # noqa: E402
from ragsae.sae import SparseAutoencoder, train_sae  # noqa: E402
from ragsae.storage import atomic_output, write_json_atomic  # noqa: E402
from ragsae.text import Document, fingerprint, split_passages  # noqa: E402

logger = logging.getLogger("generated_sae")

STUDY = "generated-sae"
GENERATION_SCHEME = "1"
"""Bumped when the same settings would generate other texts (prompt building, stopping, cleaning)."""

TOPICS: dict[str, tuple[str, ...]] = {
    "physics and chemistry": (
        "gravity",
        "quantum mechanics",
        "thermodynamics",
        "electromagnetism",
        "the theory of relativity",
        "nuclear fission",
        "superconductivity",
        "optics and lenses",
        "sound waves",
        "the periodic table",
        "chemical bonds",
        "acids and bases",
        "catalysts",
        "polymers",
        "radioactivity",
        "semiconductors",
        "entropy",
        "friction",
        "magnetism",
        "crystal structures",
    ),
    "biology and earth science": (
        "photosynthesis",
        "DNA replication",
        "evolution by natural selection",
        "the human immune system",
        "cell division",
        "bacteria",
        "viruses",
        "coral reefs",
        "rainforests",
        "bird migration",
        "honeybees",
        "plate tectonics",
        "volcanoes",
        "earthquakes",
        "ocean currents",
        "climate change",
        "the water cycle",
        "glaciers",
        "soil erosion",
        "fossils",
        "black holes",
        "the solar system",
        "the life cycle of stars",
        "the Moon",
        "comets and asteroids",
    ),
    "history": (
        "the Roman Empire",
        "ancient Egypt",
        "the French Revolution",
        "the Industrial Revolution",
        "World War I",
        "World War II",
        "the Cold War",
        "the Renaissance",
        "the Silk Road",
        "the Ottoman Empire",
        "the Ming dynasty",
        "the American Civil War",
        "the fall of the Berlin Wall",
        "the printing press",
        "the Vikings",
        "the Aztec Empire",
        "the Black Death",
        "medieval castles",
        "the abolition of slavery",
        "the space race",
        "ancient Greek democracy",
        "the Meiji Restoration",
        "the partition of India",
        "the history of writing",
        "the Great Depression",
    ),
    "geography": (
        "the Amazon River",
        "the Sahara Desert",
        "the Himalayas",
        "the Great Lakes",
        "Iceland",
        "the city of Tokyo",
        "the city of Cairo",
        "the Mediterranean Sea",
        "Antarctica",
        "the Andes",
        "the Nile delta",
        "Australia's outback",
        "the Alps",
        "the Mississippi River",
        "Siberia",
        "the Caribbean islands",
        "the city of Istanbul",
        "Patagonia",
        "the Great Barrier Reef",
        "the city of Mumbai",
        "Scandinavia",
        "the Dead Sea",
        "monsoons in South Asia",
        "the Arctic",
        "urbanisation",
    ),
    "medicine and health": (
        "diabetes",
        "high blood pressure",
        "vaccination",
        "antibiotics",
        "heart disease",
        "asthma",
        "the common cold",
        "influenza",
        "sleep",
        "nutrition and vitamins",
        "exercise and fitness",
        "mental health",
        "depression",
        "anaesthesia",
        "organ transplants",
        "cancer treatment",
        "allergies",
        "kidney stones",
        "migraine",
        "pregnancy",
        "dental care",
        "first aid",
        "obesity",
        "Alzheimer's disease",
        "medical imaging",
    ),
    "law and government": (
        "contract law",
        "copyright",
        "patents",
        "criminal trials",
        "the jury system",
        "human rights",
        "constitutional law",
        "elections",
        "taxation",
        "immigration law",
        "tenant rights",
        "divorce and custody",
        "international law",
        "the United Nations",
        "the European Union",
        "freedom of speech",
        "privacy law",
        "employment law",
        "wills and inheritance",
        "traffic law",
        "consumer protection",
        "parliamentary systems",
        "local government",
        "the Supreme Court",
        "antitrust law",
    ),
    "technology and computing": (
        "the internet",
        "computer programming",
        "artificial intelligence",
        "machine learning",
        "databases",
        "cybersecurity",
        "smartphones",
        "cloud computing",
        "operating systems",
        "search engines",
        "encryption",
        "social media",
        "open-source software",
        "computer networks",
        "robotics",
        "3D printing",
        "virtual reality",
        "electric cars",
        "batteries",
        "solar panels",
        "GPS navigation",
        "email",
        "video games",
        "spreadsheets",
        "data compression",
    ),
    "engineering": (
        "bridges",
        "skyscrapers",
        "dams",
        "tunnels",
        "steam engines",
        "internal combustion engines",
        "wind turbines",
        "nuclear power plants",
        "railways",
        "water treatment",
        "concrete",
        "steel production",
        "heat exchangers",
        "control systems",
        "welding",
        "gears and transmissions",
        "pumps",
        "electrical grids",
        "structural vibration",
        "materials fatigue",
        "pipelines",
        "hydraulics",
        "composite materials",
        "heat transfer",
        "fluid flow in pipes",
    ),
    "aeronautics and space": (
        "how airplanes fly",
        "jet engines",
        "helicopters",
        "supersonic flight",
        "wind tunnels",
        "the boundary layer",
        "wing design",
        "air traffic control",
        "gliders",
        "rockets",
        "satellites",
        "the International Space Station",
        "the Apollo missions",
        "Mars rovers",
        "hypersonic vehicles",
        "aircraft stability",
        "turbulence",
        "shock waves",
        "propellers",
        "airports",
        "drones",
        "aircraft materials",
        "spacecraft re-entry heating",
        "orbital mechanics",
        "the Wright brothers",
    ),
    "finance and economics": (
        "inflation",
        "interest rates",
        "the stock market",
        "bonds",
        "mortgages",
        "credit cards",
        "retirement savings",
        "central banks",
        "supply and demand",
        "unemployment",
        "international trade",
        "cryptocurrency",
        "insurance",
        "budgeting",
        "small business loans",
        "taxes on income",
        "economic recessions",
        "exchange rates",
        "accounting",
        "startups",
        "banking",
        "pensions",
        "real estate investing",
        "globalisation",
        "minimum wage",
    ),
    "sport": (
        "football",
        "basketball",
        "tennis",
        "cricket",
        "the Olympic Games",
        "marathon running",
        "swimming",
        "cycling",
        "golf",
        "baseball",
        "rugby",
        "chess",
        "boxing",
        "skiing",
        "the FIFA World Cup",
        "yoga",
        "rock climbing",
        "sailing",
        "ice hockey",
        "sports injuries",
        "volleyball",
        "table tennis",
        "martial arts",
        "horse racing",
        "surfing",
    ),
    "arts and culture": (
        "classical music",
        "jazz",
        "rock and roll",
        "Shakespeare",
        "the novel",
        "poetry",
        "impressionist painting",
        "sculpture",
        "photography",
        "cinema",
        "animation",
        "opera",
        "ballet",
        "architecture styles",
        "museums",
        "comic books",
        "theatre",
        "folk tales",
        "Greek mythology",
        "hip hop",
        "the Beatles",
        "Leonardo da Vinci",
        "pottery",
        "fashion design",
        "television series",
    ),
    "everyday life": (
        "cooking pasta",
        "baking bread",
        "coffee",
        "tea",
        "gardening",
        "houseplants",
        "pet dogs",
        "cats",
        "moving house",
        "job interviews",
        "learning a language",
        "studying for exams",
        "travel on a budget",
        "camping",
        "cleaning the house",
        "saving energy at home",
        "recycling",
        "wedding planning",
        "parenting toddlers",
        "time management",
        "buying a used car",
        "public transport",
        "friendship",
        "birthdays",
        "online shopping",
    ),
}
"""Hand-written topics, by domain; nothing is read from a collection."""
FORMS = (
    "Write an encyclopedia paragraph about {}.",
    "Explain {} to a student.",
    "Write a news report about {}.",
    "Answer a question someone might ask about {}.",
    "Describe the history of {}.",
    "List some key facts about {}.",
)
"""How each topic is asked for (a prompt is a form filled with a topic)."""
TEMPERATURE = 0.8
TOP_P = 0.95
CANDIDATES = 1024
"""Most likely tokens among which the top-p nucleus is drawn (`NucleusSampler`)."""
MAX_NEW_TOKENS = 200
GENERATION_BATCH = 16
"""Prompts per `generate` call (left-padded)."""
SAVE_EVERY = 10
"""Batches between writes of the partial generation (what an interrupted run resumes from)."""


# --- generation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One generation request: a form filled with a topic."""

    domain: str
    topic: str
    form: int

    @property
    def text(self) -> str:
        return FORMS[self.form].format(self.topic)


@dataclass(frozen=True)
class GenerationSettings:
    """What determines the generated texts (with the model and the prompts)."""

    gen_tokens: int
    seed: int = 0
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    candidates: int = CANDIDATES
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = GENERATION_BATCH


@dataclass
class Generated:
    """Generated texts with their prompts, and how the generation went."""

    records: list[dict[str, Any]]
    record: dict[str, Any]

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]


def prompts(seed: int) -> list[Prompt]:
    """Every topic crossed with every form, in one seeded order."""
    items = [
        Prompt(domain, topic, form)
        for domain, topics in TOPICS.items()
        for topic in topics
        for form in range(len(FORMS))
    ]
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def generation_key(llm: LoadedLlm, items: list[Prompt], settings: GenerationSettings) -> str:
    """Cache key of a generation: model activation key, prompts, settings and scheme."""
    identity = {
        "model": llm.activation_key,
        "prompts": fingerprint([f"{p.domain}\t{p.text}" for p in items]),
        "settings": dataclasses.asdict(settings),
        "scheme": GENERATION_SCHEME,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest), with the padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_special(tokens: list[int], special: set[int]) -> list[int]:
    """Tokens before the first special token (end of turn, padding, or a new chat turn the model began)."""
    for i, token in enumerate(tokens):
        if token in special:
            return tokens[:i]
    return tokens


def clean_text(text: str) -> str:
    """Generated text without chat-template leftovers (role names a turn may start with) or outer space."""
    text = text.strip()
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        text = text.replace(marker, "")
    for role in ("assistant\n", "assistant:", "Assistant:"):
        if text.startswith(role):
            text = text[len(role) :]
    return text.strip()


class NucleusSampler:
    """Temperature then top-p sampling among the `candidates` most likely tokens, as a transformers
    logits processor run under greedy decoding: it returns -inf everywhere but at the token it drew,
    which greedy decoding then takes. transformers' own top-p sorts and samples the whole vocabulary at
    every step; this sorts `candidates` tokens. The nucleus is exact unless the candidates hold less
    than `top_p` of the probability, when it is cut to them (`truncated` counts those draws)."""

    def __init__(self, temperature: float, top_p: float, candidates: int, seed: int):
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = self.truncated = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / self.temperature
        top = logits.topk(min(self.candidates, logits.shape[-1]), dim=-1)  # sorted, most likely first
        probs = (top.values - logits.logsumexp(-1, keepdim=True)).exp()
        kept = torch.where(probs.cumsum(-1) - probs < self.top_p, probs, 0.0)  # smallest set reaching top_p
        self.draws += len(probs)
        self.truncated += int((probs.sum(-1) < self.top_p).sum())
        chosen = top.indices.gather(1, torch.multinomial(kept, 1, generator=self.generator))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen.to(scores.device), 0.0)


@torch.inference_mode()
def generate_batch(
    llm: LoadedLlm, batch: list[Prompt], settings: GenerationSettings, seed: int
) -> tuple[list[list[int]], NucleusSampler]:
    """New tokens of each prompt (cut at the first special token), sampled with `seed`; and the sampler."""
    from transformers import LogitsProcessorList

    tokenizer = llm.tokenizer
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True)
        for p in batch
    ]
    rows = [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_padded(rows, pad_id)
    sampler = NucleusSampler(settings.temperature, settings.top_p, settings.candidates, seed)
    out = llm.model.generate(
        input_ids=ids.to(llm.device),
        attention_mask=mask.to(llm.device),
        do_sample=False,  # the sampler draws; greedy decoding takes its draw
        logits_processor=LogitsProcessorList([sampler]),
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    special = set(tokenizer.all_special_ids)
    return [cut_at_special(row.tolist(), special) for row in out[:, ids.shape[1] :].cpu()], sampler


def generate_texts(
    llm: LoadedLlm, items: list[Prompt], settings: GenerationSettings, cache_root: Path, progress: bool = True
) -> Generated:
    """Texts generated from `items` (cycled) until `settings.gen_tokens` new tokens exist, from the
    cache when there, resuming a partial generation when there is one."""
    folder = cache_root / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    key = generation_key(llm, items, settings)
    final, meta_path, partial = folder / f"{key}.jsonl", folder / f"{key}.json", folder / f"{key}.partial.json"
    if final.is_file() and meta_path.is_file():
        records = [json.loads(line) for line in final.read_text(encoding="utf-8").splitlines() if line]
        return Generated(records, {**json.loads(meta_path.read_text()), "cached": True})
    state: dict[str, Any] = {"batches": 0, "seconds": 0.0, "tokens": 0, "dropped": 0, "records": []}
    if partial.is_file():
        state = json.loads(partial.read_text())
        logger.warning("resuming generation %s after %d batches", key, state["batches"])
    bar = tqdm(total=settings.gen_tokens, initial=state["tokens"], desc="generate", unit="tok", disable=not progress)
    while state["tokens"] < settings.gen_tokens:
        b = state["batches"]
        lo = (b * settings.batch_size) % len(items)
        batch = [items[(lo + i) % len(items)] for i in range(settings.batch_size)]
        start = time.perf_counter()
        outputs, sampler = generate_batch(llm, batch, settings, settings.seed * 1_000_003 + b)
        state["seconds"] += time.perf_counter() - start
        state["draws"] = state.get("draws", 0) + sampler.draws
        state["truncated"] = state.get("truncated", 0) + sampler.truncated
        for i, (prompt, tokens) in enumerate(zip(batch, outputs)):
            state["tokens"] += len(tokens)
            text = clean_text(llm.tokenizer.decode(tokens, skip_special_tokens=True))
            if not text:
                state["dropped"] += 1
                continue
            record = {
                **dataclasses.asdict(prompt),
                "prompt": prompt.text,
                "round": (b * settings.batch_size + i) // len(items),
            }
            state["records"].append({**record, "tokens": len(tokens), "text": text})
        state["batches"] = b + 1
        bar.update(sum(len(t) for t in outputs))
        if state["batches"] % SAVE_EVERY == 0:
            write_json_atomic(partial, state)
    bar.close()
    record = {
        "key": key,
        "path": str(final),
        "texts": len(state["records"]),
        "dropped_empty": state["dropped"],
        "new_tokens": state["tokens"],
        "seconds": state["seconds"],
        "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9),
        "nucleus_truncated_fraction": state.get("truncated", 0) / max(state.get("draws", 0), 1),
        "batches": state["batches"],
        "prompts": len(items),
        "topics": sum(len(t) for t in TOPICS.values()),
        "forms": list(FORMS),
        "device": str(llm.device),
        "dtype": llm.dtype_name,
        "torch_threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(settings),
        "scheme": GENERATION_SCHEME,
    }
    write_json_atomic(meta_path, record)
    with atomic_output(final, "w") as handle:  # written last: its presence marks a complete generation
        for r in state["records"]:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    return Generated(state["records"], {**record, "cached": False})


# --- training data and SAEs ----------------------------------------------------------------------
def generated_passages(llm: LoadedLlm, build: BuildConfig, texts: list[str]) -> list[str]:
    """Generated texts split into passages as a collection's documents are (`load_collection`)."""
    documents = [Document(f"generated-{i}", text) for i, text in enumerate(texts)]
    cfg = build.capture
    return [p.text for p in split_passages(documents, llm.tokenizer, cfg.window, cfg.overlap)]


def joined(parts: list[tuple[list[str], TokenActivations]], seed: int) -> tuple[list[str], TokenActivations]:
    """Passages of several sources with their activations, in one seeded shuffled order of passages."""
    texts = [text for part_texts, _ in parts for text in part_texts]
    values = [np.asarray(acts.values) for _, acts in parts]
    starts = np.cumsum([0] + [len(v) for v in values])
    spans = [
        (int(s + acts.offsets[i]), int(s + acts.offsets[i + 1]))
        for s, (_, acts) in zip(starts, parts)
        for i in range(len(acts))
    ]
    order = np.random.default_rng(seed).permutation(len(texts))
    stacked = np.concatenate(values)
    rows = np.concatenate([np.arange(*spans[i]) for i in order]) if len(order) else np.zeros(0, dtype=np.int64)
    lengths = np.array([spans[i][1] - spans[i][0] for i in order], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return [texts[i] for i in order], TokenActivations(stacked[rows], offsets)


def adapt_config(base: SaeConfig, rows: int, steps: int) -> SaeConfig:
    """`base` with epochs and max_tokens giving `steps` optimiser steps over `rows` activation rows:
    one epoch over steps x batch_size sampled rows, or, when there are fewer rows, enough epochs over
    all of them to reach at least `steps`."""
    want = steps * base.batch_size
    if rows >= want:
        return dataclasses.replace(base, epochs=1, max_tokens=want)
    per_epoch = max(1, rows // base.batch_size)
    return dataclasses.replace(base, epochs=-(-steps // per_epoch), max_tokens=rows)


def adapt(generic: SparseAutoencoder, acts: TokenActivations, config: SaeConfig, device: Any) -> SparseAutoencoder:
    """The generic SAE trained further on `acts` (`train_sae(start_from=...)`); keeps its metadata."""
    sae, report = train_sae(acts.values, config, device, True, start_from=generic)
    sae.metadata = {**generic.metadata, "train": report.to_json(), "generic_train": generic.metadata.get("train")}
    return sae.eval()


def trained_rows(sae: SparseAutoencoder) -> int:
    """Distinct activation rows an SAE trained on (its report's tokens over its epochs)."""
    return int(sae.metadata.get("train", {}).get("tokens", 0)) // sae.config.epochs


def steps_of(sae: SparseAutoencoder) -> int:
    return int(sae.metadata.get("train", {}).get("steps", 0))


# --- study -------------------------------------------------------------------------------------
def study_generated(
    setup: Setup, other: Collection, generated: list[str], gen_only: bool, adapt_steps: int
) -> list[dict[str, Any]]:
    """Rows of the study (module docstring) on the setup's collection."""
    collection, build = setup.collection, setup.build
    llm, cfg = collection.llm, build.capture
    cache = ActivationCache(collection.cache_root / "activations")
    sample = np.asarray(setup.acts.values[:FVU_ROWS], dtype=np.float32)

    def row(label: str, sae: SparseAutoencoder, tokens: int, target: int, steps: int, **details: Any) -> dict[str, Any]:
        columns = {"train tokens": tokens, "target tokens": target, "steps": steps}
        return sae_row(setup, label, sae, sample, columns, **details)

    own = trained_rows(setup.sae)
    rows = [row(f"own SAE ({collection.name} passages)", setup.sae, own, own, steps_of(setup.sae))]
    other_acts, _ = timed_capture(llm, other.texts, cfg, cache, True, need_timing=False)
    other_sae = cached_sae(llm, other.texts, other_acts, cfg, build.sae, collection.cache_root, True).eval()
    rows.append(row(f"{other.name}'s own SAE, frozen", other_sae, trained_rows(other_sae), 0, steps_of(other_sae)))
    gen_acts, _ = timed_capture(llm, generated, cfg, cache, True, need_timing=False)
    logger.warning("generated passages: %d, %d tokens", len(generated), len(gen_acts.values))
    if gen_only:
        sae = cached_sae(llm, generated, gen_acts, cfg, build.sae, collection.cache_root, True).eval()
        rows.append(row("generated-text SAE, frozen", sae, trained_rows(sae), 0, steps_of(sae)))
    texts, union = joined([(generated, gen_acts), (other.texts, other_acts)], build.sae.seed)
    generic = cached_sae(llm, texts, union, cfg, build.sae, collection.cache_root, True).eval()
    generic_rows = trained_rows(generic)
    rows.append(row(f"generic SAE (generated + {other.name}), frozen", generic, generic_rows, 0, steps_of(generic)))
    if adapt_steps > 0:
        config = adapt_config(build.sae, len(setup.acts.values), adapt_steps)
        start = time.perf_counter()
        adapted = adapt(generic, setup.acts, config, llm.device)
        seconds = time.perf_counter() - start
        rows.append(
            row(
                f"generic SAE adapted on {collection.name} ({steps_of(adapted)} steps)",
                adapted,
                generic_rows + trained_rows(adapted),
                trained_rows(adapted),
                steps_of(generic) + steps_of(adapted),
                adapt_config=to_dict(config),
                adapt_seconds=seconds,
            )
        )
    return rows


def run(
    args: argparse.Namespace, build: BuildConfig | None = None, llm: LoadedLlm | None = None
) -> tuple[dict[str, Any], str]:
    """Generate, capture, train and score (module docstring); write the JSON and Markdown; return them.
    `build` and `llm` default to the default build and its LLM (tests pass a tiny one)."""
    started, commit = time.perf_counter(), git_commit()
    build = build or BuildConfig()
    torch.manual_seed(build.sae.seed)
    cache_root = Path(args.cache_dir)
    collection = load_collection(args.dataset, args.split, build, cache_root, llm)
    llm = collection.llm
    other = load_collection(args.other, args.split, build, cache_root, llm)
    if fingerprint(other.texts) == fingerprint(collection.texts):
        raise ValueError(f"--other {args.other} has the passages of the evaluated collection {args.dataset}")
    setup = make_setup(collection, build)
    settings = GenerationSettings(args.gen_tokens, args.seed)
    generation = generate_texts(llm, prompts(args.seed), settings, cache_root)
    passages = generated_passages(llm, build, generation.texts)
    rows = study_generated(setup, other, passages, args.gen_only, args.adapt_steps)
    record = {**generation.record, "passages": len(passages)}
    options = {
        "other": str(args.other),
        "gen_tokens": args.gen_tokens,
        "adapt_steps": args.adapt_steps,
        "gen_only": args.gen_only,
        "seed": args.seed,
    }
    result = study_record(collection, STUDY, args.split, str(args.dataset), build, commit, options)
    result.update(generation=record, seconds=time.perf_counter() - started, rows=rows)
    title = f"{collection.name}: {STUDY} ({collection.documents} documents, {len(collection.queries)} judged queries)"
    cached = " (cached; measured when generated)" if record["cached"] else ""
    note = (
        f"\nGenerated: {record['texts']} texts, {record['new_tokens']} new tokens, {record['passages']} passages, "
        f"{record['seconds']:.0f} s at {record['tokens_per_s']:.1f} tokens/s on {record['device']} "
        f"({record['dtype']}, torch threads: {record['torch_threads']}){cached}.\n"
    )
    table = markdown_table(rows, title) + note
    write_study(Path(args.output_dir), study_stem(collection.name, STUDY), result, table)
    return result, table


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="An SAE trained on LLM-generated text and another collection, scored on a BEIR collection "
        "(see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset", help="BEIR-layout folder scored (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    parser.add_argument("--other", required=True, metavar="DATASET_DIR", help="collection whose passages also train")
    parser.add_argument("--gen-tokens", type=int, default=300_000, help="new tokens to generate")
    parser.add_argument("--adapt-steps", type=int, default=300, help="steps of 1024 tokens adapting on the collection")
    parser.add_argument("--gen-only", action="store_true", help="also score an SAE trained on generated text alone")
    parser.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
    parser.add_argument("--split", default="test", help="qrels split")
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="activation, SAE and generation cache")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON and Markdown go")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.gen_tokens < 1 or args.adapt_steps < 0:
        parser.error("--gen-tokens must be >= 1 and --adapt-steps >= 0")
    if Path(args.other).resolve() == Path(args.dataset).resolve():
        parser.error("--other must be another collection than DATASET_DIR (its text would train the SAE)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print_study(*run(args), args.output_dir, STUDY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
