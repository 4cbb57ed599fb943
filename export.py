"""Trained adapters leaving the project, for a Hugging Face LLaMA (transformers' LlamaForCausalLM).

    python eval.py --ckpt runs/lora --export exported/lora

LoRA becomes a PEFT adapter directory: adapter_config.json and adapter_model.safetensors with keys
`base_model.model.model.layers.N.mlp.gate_proj.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r):

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "exported/lora")

MoELoRA, HydraLoRA and TeamLoRA have no PEFT equivalent: their tensors keep teamlora.py's names
under Hugging Face module names (`model.layers.N.mlp.gate_proj.lora_A`, `...router.lora_gate`), and
teamlora_config.json holds add_adapters' keyword arguments. With teamlora.py copied:

    teamlora.add_adapters(model, **json.load(open("exported/teamlora/teamlora_config.json"))).eval()
    teamlora.load_adapter_state_dict(model, safetensors.torch.load_file("exported/teamlora/adapter_model.safetensors"))

Module names: layers.N.attention.wq/wk/wv/wo -> model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj,
layers.N.feed_forward.w1/w2/w3 -> model.layers.N.mlp.gate_proj/down_proj/up_proj, output -> lm_head.
RoPE: model.py reorders a Hugging Face base's q/k rows into Meta's interleaved pairs, so q/k adapters
trained here produce rows in that order. On export their output side (lora_B's d_out rows) goes back
to Hugging Face's rotate-half order; lora_A and the routers read the layer's input and are unchanged.
A base in Meta layout (params.json, e.g. the tiny base) exports the same way: the adapters then fit
its Hugging Face conversion (transformers' convert_llama_weights_to_hf.py), which applies this same
reordering to wq/wk.

The directory is written whole under a temporary name, then put in place: exporting again into a
former export replaces it entirely (no stale file of the earlier export stays). A directory that
holds anything but an export's files is refused untouched, so a user's directory is never cleared.
"""
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

import common
import teamlora
from common import UserError, save_safetensors
from model import Transformer, checkpoint_args

# What an export writes: a directory holding only these (or nothing) is an earlier export, which a
# new one replaces whole; any other file in it is the user's, and the export is refused.
FILES = ("adapter_config.json", "teamlora_config.json", "adapter_model.safetensors", "README.md")

HF_MODULES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}


def hf_module(name: str) -> str:
    """`layers.3.feed_forward.w1` -> `model.layers.3.mlp.gate_proj`; `output` -> `lm_head`."""
    if name == "output":
        return "lm_head"
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_MODULES[rest]}"


def to_rotate_half(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Output rows (dim -2) from Meta's pairs (2i, 2i+1 in each head) to Hugging Face's order (each
    head's even rows, then its odd rows): the inverse of model._unpermute_hf. t: (..., d_out, r)."""
    return t.unflatten(-2, (n_heads, -1, 2)).transpose(-3, -2).flatten(-4, -2)


def hf_adapter_state(model) -> dict:
    """The model's adapter tensors keyed by Hugging Face module names, q/k output rows in rotate-half order."""
    a = model.args
    heads = {"attention.wq": a.n_heads, "attention.wk": a.n_kv_heads or a.n_heads}  # GQA: wk has n_kv_heads
    out = {}
    for name, layer in teamlora.adapter_layers(model):
        for leaf, t in layer.state_dict().items():
            if not leaf.rsplit(".", 1)[-1].startswith(teamlora.PREFIX):
                continue  # the frozen base weight
            if leaf == "lora_B" and name.endswith(tuple(heads)):
                t = to_rotate_half(t, heads[name.split(".", 2)[2]])
            out[f"{hf_module(name)}.{leaf}"] = t.detach().float().contiguous()
    return out


def load_adapters(out_dir, base=None):
    """(model, config) of a train.py run for export: its adapters with their trained values on the
    base built on the meta device. Export renames tensors, so not one weight of the base is read
    (a 7B base is 28 GB in float32): only its config, for the shapes and head counts."""
    ckpt, path, _ = common.open_run(out_dir, base)
    with torch.device("meta"):
        model = Transformer(checkpoint_args(path))
    if ckpt["adapter"] is not None:  # --method full has none: export_adapters says so
        teamlora.add_adapters(model, **ckpt["adapter"])  # on meta too: shapes only
        with warnings.catch_warnings():  # torch warns that copying into meta tensors does nothing: known
            warnings.simplefilter("ignore")
            teamlora.load_adapter_state_dict(model, ckpt["tensors"])  # the checks: keys and shapes
        model.load_state_dict(ckpt["tensors"], strict=False, assign=True)  # the values: the file's tensors themselves
    return model, ckpt["config"]


def check_export_dir(out_dir):
    """An export goes into a new or empty directory, or replaces an earlier export (only FILES, with
    adapter_model.safetensors among them); a directory holding anything else is refused untouched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--export {out}: a file, not a directory")
    held = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in held if name not in FILES]
    if foreign or (held and "adapter_model.safetensors" not in held):
        raise UserError(f"--export {out} holds files that are not an export ({', '.join(foreign or held)}): "
                        "export into a new or empty directory, or one that holds an earlier export")


def replace_dir(tmp, out):
    """tmp (complete) becomes out, and an earlier export in out goes whole: no stale file of it stays
    beside the new ones (a PEFT adapter_config.json beside TeamLoRA tensors)."""
    old = out.with_name(f"{out.name}.old{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_adapters(model, config, out_dir) -> Path:
    """Write the adapters of `model` (load_adapters or common.load_run of the run whose `config` it is) to out_dir."""
    layers = teamlora.adapter_layers(model)
    if not layers:
        raise UserError(f"--export: the run fine-tuned every weight (--method {config['method']}); "
                        "there are no adapters to export")
    out, base = Path(out_dir), str(config["base"])
    check_export_dir(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # written whole, then put in out's place
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = hf_adapter_state(model)
    targets = sorted({hf_module(n).rsplit(".", 1)[-1] for n, _ in layers})
    if config["method"] == "lora":
        peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
                "inference_mode": True, "r": config["rank"], "lora_alpha": config["alpha"],
                "lora_dropout": config["dropout"], "target_modules": targets, "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,  # PEFT's scale: lora_alpha / r
                "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
        (tmp / "adapter_config.json").write_text(json.dumps(peft, indent=2))
        state = {f"base_model.model.{k}.weight": t for k, t in state.items()}
        usage = ("    from peft import PeftModel\n    from transformers import AutoModelForCausalLM\n"
                 f"    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r})")
    else:
        kwargs = {"method": config["method"], "rank": config["rank"], "experts": config["experts"],
                  "alpha": config["alpha"], "dropout": config["dropout"], "targets": targets,
                  "router": layers[0][1].router.kind}  # the router used, also when the run left it to the default
        (tmp / "teamlora_config.json").write_text(json.dumps(kwargs, indent=2))
        usage = ("    import json, safetensors.torch, teamlora  # teamlora.py copied from the project\n"
                 "    from transformers import AutoModelForCausalLM\n"
                 f"    model = AutoModelForCausalLM.from_pretrained({base!r})\n"
                 f"    teamlora.add_adapters(model, **json.load(open({str(out / 'teamlora_config.json')!r}))).eval()\n"
                 "    teamlora.load_adapter_state_dict(model, safetensors.torch.load_file("
                 f"{str(out / 'adapter_model.safetensors')!r}))")
    save_safetensors(state, tmp / "adapter_model.safetensors",
                     metadata={"format": "pt", "base_model_name_or_path": base})
    note = ""
    if (Path(base) / "params.json").exists() and not (Path(base) / "config.json").exists():
        note = (f"\nnote: {base} is in Meta layout; load these adapters on its Hugging Face conversion "
                "(transformers' convert_llama_weights_to_hf.py): their q/k rows already follow its order.\n")
    if config.get("quantize"):  # the base's layers as the adapters saw them in training
        hf = {"nf4": "load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True",
              "int8": "load_in_8bit=True"}[config["quantize"]]
        note += (f"\nnote: trained on a base quantized with bitsandbytes (--quantize {config['quantize']}); "
                 f"to match training, load it with quantization_config=BitsAndBytesConfig({hf}).\n")
    (tmp / "README.md").write_text(f"# {config['method']} adapters for {base}\n\nTrained with the TeamLoRA "
                                   f"reference implementation. Load them with\n\n{usage}\n{note}")
    replace_dir(tmp, out)
    print(f"{config['method']}: {len(state)} adapter tensors -> {out}\n{usage}{note}")
    return out
