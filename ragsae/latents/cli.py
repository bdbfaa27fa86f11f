"""Subcommands `ragsae latents`, `ragsae atlas` and `ragsae explain`, added to the main parser by
`add_latent_parsers`. `latents` and `atlas` read only the index's latent catalog (no LLM is loaded);
`explain` opens the index through the loader the main CLI passes in (this room sits below `index/`)."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import QueryError
from .atlas import write_atlas
from .catalog import LatentCard, LatentCatalog, clean_token

IndexLoader = Callable[[argparse.Namespace], Any]
"""Opens the index named by `args.index` (with `args.device`), for `explain`."""
CatalogLoader = Callable[[str], LatentCatalog]
"""Reads the latent catalog of the index folder it is given (checked against the index's manifest)."""


def card_summary(card: LatentCard) -> str:
    """One line: id, label, how often it fires."""
    return f"#{card.latent:<6} {card.label:<40}  {100 * card.passage_frequency:5.1f}% of passages, {card.tokens} tokens"


def format_card(card: LatentCard, catalog: LatentCatalog) -> str:
    """A latent's card as text."""
    lines = [
        f"Latent #{card.latent}: {card.label}",
        f"  fires on {card.passages} passages ({100 * card.passage_frequency:.2f}%) and {card.tokens} tokens "
        f"({100 * card.token_frequency:.3f}%); mean activation {card.mean_activation}, max {card.max_activation}",
        "  top contexts:",
    ]
    for c in card.contexts:
        context = " ".join(f"{c.left}[[{c.token}]]{c.right}".split())
        lines.append(f"    {c.activation:8.3f}  {c.passage_id}: ...{context}...")
    lines.append("  characteristic tokens (fires on / occurrences):")
    lines.append(
        "    " + ", ".join(f'"{clean_token(t.token)}" {t.fires}/{t.count}' for t in card.characteristic)
        if card.characteristic
        else "    (none)"
    )
    lines.append("  logit lens: " + (", ".join(f'"{clean_token(t)}"' for t in card.logit_lens) or "(not available)"))
    lines.append(
        "  nearest latents: " + ", ".join(f"#{j} {catalog.label(j)} ({cos:.2f})" for j, cos in card.neighbours)
    )
    return "\n".join(lines)


def cmd_latents(args: argparse.Namespace, load_catalog: CatalogLoader) -> int:
    catalog = load_catalog(args.index)
    if args.id is not None:
        card = catalog.card(args.id)
        print(json.dumps(card.to_json(), indent=2, ensure_ascii=False) if args.json else format_card(card, catalog))
        return 0
    if args.search is not None:
        cards = catalog.search(args.search, limit=args.limit)
        if not cards and not args.json:
            raise QueryError(f"no latent fires on {args.search!r} or has it in its label")
    else:
        order = sorted(range(len(catalog)), key=lambda i: (-int(catalog.columns["tokens"][i]), i))
        cards = [catalog.card(int(catalog.live[i])) for i in order[: args.limit]]
    if args.json:
        print(json.dumps([c.to_json() for c in cards], indent=2, ensure_ascii=False))
        return 0
    if args.search is None:
        print(
            f"{len(catalog)} live latents of {catalog.num_latents} ({catalog.dead} never fire) on "
            f"{catalog.passages} passages; the {len(cards)} most frequent:"
        )
    for card in cards:
        print(card_summary(card))
    return 0


def cmd_atlas(args: argparse.Namespace, load_catalog: CatalogLoader) -> int:
    catalog = load_catalog(args.index)
    path = write_atlas(catalog, args.output, title=args.title or f"Latent atlas of {Path(args.index).name}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(catalog)} latents)")
    return 0


def cmd_explain(args: argparse.Namespace, load_index: IndexLoader) -> int:
    explanation = load_index(args).explain(args.query, args.doc)
    if args.json:
        print(json.dumps(explanation.to_json(), indent=2, ensure_ascii=False))
    else:
        print(explanation.format(top=args.top))
    return 0


def add_latent_parsers(subparsers: Any, load_index: IndexLoader, load_catalog: CatalogLoader) -> None:
    """Add `latents`, `atlas` and `explain` to the main parser's subcommands; `load_index(args)` opens
    `args.index` for `explain` (`Index.load(args.index, device=args.device)`), `load_catalog(path)` reads
    an index's catalog for `latents` and `atlas` (`Index.latent_catalog`)."""
    p = subparsers.add_parser(
        "latents",
        help="find latents by label or by a token they fire on; show one latent's card",
        description="List an index's latents (the most frequent by default), search them by label or by "
        "a token they fire on, or show one latent's card. Reads the index's latent catalog only.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("--search", metavar="WORD", help="latents that fire on WORD or have it in their label")
    p.add_argument("--id", type=int, metavar="N", help="show latent N's card")
    p.add_argument("--limit", type=int, default=20, help="latents listed (default: 20)")
    p.add_argument("--json", action="store_true", help="print cards as JSON")
    p.set_defaults(func=functools.partial(cmd_latents, load_catalog=load_catalog))

    p = subparsers.add_parser(
        "atlas",
        help="write a self-contained HTML atlas of an index's latents",
        description="Write one HTML file (no network needed to open it): a searchable list of latents with "
        "labels and frequencies, and per latent its top contexts, histogram, tokens and nearest latents.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("-o", "--output", required=True, help="HTML file to write (e.g. atlas.html)")
    p.add_argument("--title", help="page title (default: 'Latent atlas of INDEX')")
    p.set_defaults(func=functools.partial(cmd_atlas, load_catalog=load_catalog))

    p = subparsers.add_parser(
        "explain",
        help="why a passage matches a query: shared latents with labels, shares and firing tokens",
        description="Explain the sparse score of the top hit for QUERY (or of document/passage --doc): "
        "every latent query and passage share, its label, its share of the score and the passage tokens "
        "where it fires.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("query")
    p.add_argument("--doc", metavar="ID", help="explain this document (its best passage) or passage instead")
    p.add_argument("--top", type=int, default=10, help="latents shown (default: 10; --json has all)")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.set_defaults(func=functools.partial(cmd_explain, load_index=load_index))
