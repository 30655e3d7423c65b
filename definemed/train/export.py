"""Export a DCP training checkpoint as a Hugging Face model directory (safetensors) that transformers, vLLM and
mergekit load, with a lineage manifest beside the weights. Runs in one process, no process group needed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_checkpoint_into_hf(ckpt_dir: str | os.PathLike, base_model: str, dtype: str = "bfloat16"):
    """A fresh HF model of the base architecture with the checkpoint's weights (cast to `dtype`)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(base_model)
    with no_init_weights():  # every weight comes from the checkpoint (a random init of gemma-3-270m took 6 s)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    reader = dcp.FileSystemReader(str(ckpt_dir))
    saved = set(reader.read_metadata().state_dict_metadata)
    sd = model.state_dict()
    want = {k: v for k, v in sd.items() if f"model.{k}" in saved}
    missing = set(sd) - set(want)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if missing - tied:
        raise KeyError(f"checkpoint {ckpt_dir} lacks weights: {sorted(missing - tied)[:5]}")
    state = {"model": want}
    dcp.load(state, storage_reader=reader)  # casts the fp32 master weights into `dtype` in place
    model.load_state_dict(state["model"], strict=False)
    model.tie_weights()
    return model


def export_hf(ckpt_dir: str | os.PathLike, base_model: str, out_dir: str | os.PathLike, dtype: str,
              lineage_config: Any, lineage_inputs: dict[str, str], extra: dict[str, Any], stage: str = "cpt") -> Path:
    """Write `out_dir` atomically: config, safetensors, tokenizer, generation config, lineage.json."""
    from transformers import AutoTokenizer

    from definemed.io import atomic_dir
    from definemed.lineage import write_manifest

    model = load_checkpoint_into_hf(ckpt_dir, base_model, dtype)
    model.config.use_cache = True  # training turned it off; inference wants it
    tok = AutoTokenizer.from_pretrained(base_model)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = Path(base_model) / "generation_config.json"
        if gen.exists():
            shutil.copy2(gen, tmp / "generation_config.json")
        write_manifest(tmp, stage, lineage_config, inputs=lineage_inputs,
                       extra={"artifact": "hf_model", "checkpoint": str(ckpt_dir), "dtype": dtype, **extra})
    return Path(out_dir)
