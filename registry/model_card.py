"""Model cards: README.md with YAML front matter, as the Hugging Face Hub reads them."""

from __future__ import annotations

import yaml

from registry.nesting import MAX_DEPTH, NestingError, bounded


def render(
    name: str,
    base_model: str | None,
    space_id: str,
    layout_desc: str,
    vector_sha256: str,
    kind: str,
    source: str | None,
    attributes: dict,
    lineage: list[dict],
    previews: list[str] | tuple = (),
) -> str:
    front: dict = {
        "library_name": "diffusers",
        "tags": ["lora", "w2w", "weights2weights", "text-to-image", "stable-diffusion", "diffusers"],
    }
    if base_model:
        front["base_model"] = base_model
        front["base_model_relation"] = "adapter"
    front["w2w"] = {
        "space": space_id,
        "layout": layout_desc,
        "vector_sha256": vector_sha256,
        "kind": kind,
        **({"source": source} if source else {}),
        **({"attributes": attributes} if attributes else {}),
        **({"lineage": [_lineage_entry(entry) for entry in lineage]} if lineage else {}),
    }
    if previews:  # the Hub shows these in the card's widget
        front["widget"] = [{"output": {"url": p}} for p in previews]
    body = [
        f"# {name}",
        "",
        f"A LoRA{' for `' + base_model + '`' if base_model else ''} from a w2wreg weight-space "
        f"registry (space `{space_id}`: {layout_desc}).",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        f"pipe = StableDiffusionPipeline.from_pretrained({base_model or 'BASE_MODEL'!r})",
        'pipe.load_lora_weights("THIS_REPO", weight_name="pytorch_lora_weights.safetensors")',
        "```",
    ]
    if lineage:
        body += ["", "## Lineage", ""]
        for entry in lineage:
            parent = entry.get("parent") or entry.get("parent_id")
            line = f"- {entry['operation']}" + (f" of `{parent}`" if parent is not None else "")
            if entry.get("parent_repo"):
                line += f" (`{entry['parent_repo']}` @ `{str(entry['parent_revision'])[:12]}`)"
            body.append(line)
    if previews:
        body += ["", "## Previews", ""] + [f"![preview]({p})" for p in previews]
    if attributes:
        body += ["", "## Attributes", ""] + [f"- {k}: {v}" for k, v in sorted(attributes.items())]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


def _lineage_entry(entry: dict) -> dict:
    out = {"operation": entry["operation"], "parent": entry.get("parent"), "parent_id": entry.get("parent_id")}
    if entry.get("parent_repo"):
        out |= {"parent_repo": entry["parent_repo"], "parent_revision": entry["parent_revision"],
                "parent_hub": entry.get("parent_hub")}  # fmt: skip
    if entry.get("params"):
        out["params"] = entry["params"]
    return out


def parse_front_matter(text: str) -> dict:
    """The YAML between the leading `---` lines ({} without). Raises yaml.YAMLError, or NestingError for a
    card nested too deep or too large (never RecursionError)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end <= 0:
        return {}
    try:
        card = yaml.safe_load(text[3:end])
    except RecursionError:
        raise NestingError(f"the model card's YAML is nested deeper than {MAX_DEPTH} levels") from None
    return bounded(card, "the model card's YAML") or {}
