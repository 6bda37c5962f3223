"""Published weights by name: open_clip pretrained tags, Hugging Face Hub repositories, timm tags.

One spelling per kind, the same in recipes and on the command line:

  ARCH:TAG          an open_clip architecture and one of its pretrained tags
                    (`ViT-L-14-CLIPA:datacomp1b`); on the command line also `--model ARCH --pretrained TAG`
  hf-hub:ORG/NAME   an open_clip model on the Hugging Face Hub (open_clip_config.json + weights)
  timm:NAME.TAG     a timm model's pretrained weights, for image towers (`model.image_init`)

Every download is open_clip's (`download_pretrained`, `download_pretrained_from_hf`) or timm's
(`create_model(pretrained=True)`), and both go through huggingface_hub: its cache (HF_HOME,
HF_HUB_CACHE), offline mode (HF_HUB_OFFLINE) and mirror (HF_ENDPOINT) apply unchanged. clipa itself
speaks no HTTP: it only looks into that cache (`try_to_load_from_cache`, no network) to say whether a
name is already there, and turns the libraries' failures into one line that says how to get the weights.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from clipa.errors import ClipaError, first_line

HF_HUB = "hf-hub:"
TIMM = "timm:"
LOCAL_DIR = "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


@dataclass(frozen=True)
class Published:
    """A name that resolves to published weights (no file is touched to make one)."""

    spec: str  # as the user wrote it, for messages
    kind: str  # "tag" | "hf-hub" | "timm"
    name: str  # open_clip architecture (tag), repository id (hf-hub), timm model name (timm)
    tag: str = ""  # pretrained tag (tag, timm)
    cfg: dict = field(default_factory=dict, compare=False, repr=False)  # open_clip's / timm's entry for the tag

    @property
    def repo(self) -> str:
        """The Hugging Face repository the weights come from ("" for a URL-only entry)."""
        return self.needed_files()[0][0] if self.needed_files() else ""

    def needed_files(self) -> list[tuple[str, tuple[str, ...]]]:
        """(repository, alternative filenames) for each file the libraries will fetch, in their order of preference."""
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        if self.kind == "hf-hub":
            return [(self.name, (OPEN_CLIP_CONFIG,)), (self.name, (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME))]
        if self.kind == "tag":
            hub = self.cfg.get("hf_hub", "")
            if not hub:
                return []
            # open_clip's convention: "org/name/" means the default file, "org/name/file.bin" that file; it
            # tries a .safetensors twin of a .bin/.pth first (pretrained._get_safe_alternatives).
            repo, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS_NAME
            safe = ([HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else
                    [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
            return [(repo, (*safe, filename))]
        hub_id = self.cfg.get("hf_hub_id") or ""
        if not hub_id:
            return []
        repo = hub_id.split("@")[0]
        filename = self.cfg.get("hf_hub_filename")
        # timm's load_state_dict_from_hf: model.safetensors before pytorch_model.bin
        return [(repo, (filename,) if filename else ("model.safetensors", "pytorch_model.bin"))]

    @property
    def revision(self) -> str | None:
        hub_id = (self.cfg.get("hf_hub_id") or "") if self.kind == "timm" else ""
        return hub_id.split("@", 1)[1] if "@" in hub_id else None

    def how_to_get(self) -> str:
        """The command that puts these weights into the cache on a machine with internet."""
        if self.repo:
            # open_clip's files only (LAION's repositories also hold a transformers copy of the weights)
            only = ' --include "open_clip_*"' if self.kind in ("tag", "hf-hub") else ""
            return f"`hf download {self.repo}{only}`"
        return f"run once with network access to fill the cache ({self.url_cache_path()})"

    def url_cache_path(self) -> Path | None:
        """Where open_clip / timm keep a URL-only download (no Hugging Face repository)."""
        url = self.cfg.get("url") or ""
        if not url:
            return None
        if self.kind == "tag":  # open_clip.pretrained.download_pretrained_from_url's default cache_dir
            return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)  # timm's (torch.hub's) cache


# --------------------------------------------------------------------------- parsing names


def parse(spec: str, key: str, pretrained: str | None = None) -> Published | None:
    """The published weights `spec` names, or None when it is something else (a local path, a run).

    `pretrained` is the command line's `--pretrained`: a tag when it is not an existing file.
    Unknown architectures, tags and timm names are errors naming the closest valid ones.
    """
    if spec.startswith((HF_HUB, TIMM)) and pretrained:
        raise ClipaError(f"--pretrained: not used with {spec}, which names its weights itself; drop --pretrained")
    if spec.startswith(HF_HUB):
        return _hub(spec, key)
    if spec.startswith(TIMM):
        return _timm(spec, key)
    if pretrained is not None:
        looks_like_a_path = any(sep in pretrained for sep in "/\\") or pretrained.endswith(WEIGHT_SUFFIXES)
        if looks_like_a_path or Path(pretrained).exists() or spec.startswith(LOCAL_DIR) or Path(spec).exists():
            return None
        return _tag(spec, pretrained, key, written=f"{spec} --pretrained {pretrained}", tag_key="--pretrained")
    if ":" in spec and not spec.startswith(LOCAL_DIR) and not Path(spec).exists():
        arch, _, tag = spec.partition(":")
        if arch and tag and not any(sep in arch for sep in "/\\"):
            return _tag(arch, tag, key, written=spec, tag_key=key)
    return None


def _hub(spec: str, key: str) -> Published:
    repo = spec[len(HF_HUB):].strip("/")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise ClipaError(f"{key}: {spec} is not a Hugging Face model id; write hf-hub:ORG/NAME "
                         "(e.g. hf-hub:UCSC-VLAA/ViT-L-14-CLIPA-datacomp1B)")
    return Published(spec, "hf-hub", repo)


def _tag(arch: str, tag: str, key: str, written: str, tag_key: str) -> Published:
    import open_clip
    from open_clip import pretrained as registry

    from clipa.errors import did_you_mean
    from clipa.model.build import register_configs

    register_configs()  # clipa's bundled architectures, known to open_clip by name

    if open_clip.get_model_config(arch) is None:
        with_tags = sorted({name for name, _ in registry.list_pretrained()})
        raise ClipaError(f"{key}: unknown architecture \"{arch}\" in {written}"
                         f"{did_you_mean(arch, open_clip.list_models())}; `clipa models` lists architectures with "
                         f"published weights ({len(with_tags)} of them)")
    tags = registry.list_pretrained_tags_by_model(arch)
    if not registry.is_pretrained_cfg(arch, tag):
        if not tags:
            close = did_you_mean(arch, sorted({name for name, _ in registry.list_pretrained()}))
            raise ClipaError(f"{tag_key}: {arch} has no published weights in open_clip{close}; "
                             "`clipa models` lists those that do, or give a weights file")
        raise ClipaError(f"{tag_key}: unknown pretrained tag \"{tag}\" for {arch}{did_you_mean(tag, tags)} "
                         f"(tags: {_some(tags)}; `clipa models {arch}` lists them)")
    cfg = copy.deepcopy(registry.get_pretrained_cfg(arch, tag))
    return Published(f"{arch}:{tag}", "tag", arch, tag, cfg)


def _some(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _timm(spec: str, key: str) -> Published:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    from clipa.errors import did_you_mean

    name, tag = split_model_name_tag(spec[len(TIMM):])
    if not timm.is_model(name):
        raise ClipaError(f"{key}: unknown timm model \"{name}\" in {spec}"
                         f"{did_you_mean(name, timm.list_models())}; see timm.list_models()")
    full = f"{name}.{tag}" if tag else name
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*") if "." in t]
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not tags:
        hint = f"{did_you_mean(tag, tags)} (tags: {_some(tags)})" if tags else "; it has no published weights"
        raise ClipaError(f"{key}: unknown pretrained tag \"{tag}\" for timm model {name}{hint}")
    if not (cfg.hf_hub_id or cfg.url):
        raise ClipaError(f"{key}: timm has no download for {spec}{did_you_mean(tag, tags)} (tags: {_some(tags)})")
    return Published(spec, "timm", name, cfg.tag or tag, cfg.to_dict())


# --------------------------------------------------------------------------- the local cache


def offline() -> bool:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE, or transformers' TRANSFORMERS_OFFLINE), as it reads it."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # a function in recent huggingface_hub
    return bool(check() if check else constants.HF_HUB_OFFLINE)


def is_cached(pub: Published) -> bool:
    """Whether every file `pub` needs is in the local cache. Looks only at the disk (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    files = pub.needed_files()
    if not files:
        path = pub.url_cache_path()
        return bool(path and path.is_file())
    for repo, alternatives in files:
        if not any(isinstance(try_to_load_from_cache(repo, f, revision=pub.revision), str) for f in alternatives):
            return False
    return True


def cache_note(pub: Published) -> str:
    """For `validate` / `--dry-run`: "cached" or "not cached; will download on first use (...)"."""
    where = pub.repo or pub.cfg.get("url", "")
    if is_cached(pub):
        return f"{pub.spec}: cached ({where})"
    if offline():
        return f"{pub.spec}: not cached and HF_HUB_OFFLINE is set; get it first with {pub.how_to_get()}"
    return f"{pub.spec}: not cached; will download on first use ({where})"


def _fetching(pub: Published, key: str):
    """A context for a library call that may download: one-line errors naming the weights and the fix."""
    from contextlib import contextmanager

    @contextmanager
    def guard():
        if offline() and not is_cached(pub):
            raise ClipaError(f"{key}: {pub.spec} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; get it "
                             f"with {pub.how_to_get()} (on a machine with internet, same HF_HOME), or unset "
                             "HF_HUB_OFFLINE to download it")
        try:
            yield
        except ClipaError:
            raise
        except Exception as err:  # noqa: BLE001 - network, missing file, hub error: all the same user-facing fix
            reason = first_line(err, 240) or type(err).__name__
            raise ClipaError(f"{key}: could not get {pub.spec} ({type(err).__name__}: {reason}); check the name and "
                             f"your connection (HF_ENDPOINT, HF_TOKEN for gated repositories), or get it with "
                             f"{pub.how_to_get()}") from None

    return guard()


# --------------------------------------------------------------------------- fetching


@dataclass
class OpenClipWeights:
    """What an open_clip tag or Hub repository resolves to, once in the cache."""

    weights: Path
    model_cfg: dict
    preprocess: dict  # size / mean / std / interpolation / resize_mode, as open_clip would use them
    tokenizer_name: str  # what open_clip.get_tokenizer takes for this model


def fetch_open_clip(pub: Published, key: str) -> OpenClipWeights:
    """Config and weights file of an open_clip tag or Hub repository (downloaded by open_clip if needed)."""
    import open_clip
    from open_clip import pretrained as registry

    if pub.kind == "timm":
        raise ClipaError(f"{key}: {pub.spec} is a timm image model, not a CLIP model; use it as model.image_init "
                         "(with model.image_tower), or give an open_clip ARCH:TAG or hf-hub:ORG/NAME here")
    with _fetching(pub, key):
        if pub.kind == "tag":
            weights = registry.download_pretrained(pub.cfg)
            model_cfg = open_clip.get_model_config(pub.name)
            if pub.cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
                # e.g. OpenAI's ViT-B-32: trained with QuickGELU, which the plain config lacks (open_clip
                # only warns; the model would silently compute something else).
                model_cfg["quick_gelu"] = True
            preprocess = {k: pub.cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pub.cfg}
            tokenizer_name = pub.name
        else:
            config_path = registry.download_pretrained_from_hf(pub.name, filename=OPEN_CLIP_CONFIG)
            weights = registry.download_pretrained_from_hf(pub.name)
            config = json.loads(Path(config_path).read_text(encoding="utf-8"))
            if "model_cfg" not in config:
                raise ClipaError(f"{key}: {pub.spec}'s {OPEN_CLIP_CONFIG} has no model_cfg; is it an open_clip model?")
            model_cfg, preprocess = config["model_cfg"], dict(config.get("preprocess_cfg", {}))
            tokenizer_name = pub.spec
    if not weights:
        raise ClipaError(f"{key}: open_clip has no download for {pub.spec}")
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess.setdefault("size", image_size)
    return OpenClipWeights(Path(weights), model_cfg, preprocess, tokenizer_name)


def timm_state_dict(pub: Published, key: str) -> dict:
    """A timm model's pretrained weights, loaded the way timm loads them (its download, cache and
    checkpoint conversion), as a state dict."""
    import timm

    with _fetching(pub, key):
        model = timm.create_model(f"{pub.name}.{pub.tag}" if pub.tag else pub.name, pretrained=True)
    return model.state_dict()


def state_dict(spec: str, key: str) -> dict:
    """Weights to start from: a local run / checkpoint / export / file, or a published name."""
    from clipa.model.weights import find_weights, read_state_dict

    pub = parse(spec, key)
    if pub is None:
        return read_state_dict(*find_weights(spec, key=key))
    if pub.kind == "timm":
        return timm_state_dict(pub, key)
    return read_state_dict(fetch_open_clip(pub, key).weights, "file")


def check_source(spec: str, key: str) -> str | None:
    """Validate a weights name without downloading: None for a local path (checked elsewhere), else a
    line saying whether it is cached."""
    pub = parse(spec, key)
    return None if pub is None else cache_note(pub)


# --------------------------------------------------------------------------- listing


def list_models(filter_text: str = "") -> list[dict]:
    """open_clip's architectures with their pretrained tags, each marked cached or not (disk only)."""
    from open_clip import pretrained as registry

    needle = filter_text.lower()
    rows = []
    for arch, tag in registry.list_pretrained():
        spec = f"{arch}:{tag}"
        if needle and needle not in spec.lower():
            continue
        pub = Published(spec, "tag", arch, tag, registry.get_pretrained_cfg(arch, tag))
        rows.append({"name": spec, "arch": arch, "tag": tag, "hf_hub": pub.repo, "cached": is_cached(pub)})
    return rows


def list_timm(filter_text: str) -> list[dict]:
    """timm's pretrained image models matching `filter_text` (a substring or a timm wildcard)."""
    import timm

    pattern = filter_text if any(c in filter_text for c in "*?[") else f"*{filter_text}*"
    rows = []
    for name in timm.list_pretrained(pattern):
        pub = _timm(f"{TIMM}{name}", "FILTER")
        rows.append({"name": pub.spec, "arch": pub.name, "tag": pub.tag, "hf_hub": pub.repo, "cached": is_cached(pub)})
    return rows


def tokenizer_note(text_cfg: dict) -> str | None:
    """For `validate` / `--dry-run`: whether a Hugging Face tokenizer (CLIPA-v2's bert-base-uncased) is cached."""
    name = text_cfg.get("hf_tokenizer_name")
    if not name or Path(name).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    # transformers' AutoTokenizer starts from tokenizer_config.json
    if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
        return f"tokenizer {name}: cached"
    if offline():
        return f"tokenizer {name}: not cached and HF_HUB_OFFLINE is set; get it first with `hf download {name}`"
    return f"tokenizer {name}: not cached; will download on first use"
