"""Peek at a (possibly unfinished) base-stage checkpoint while training runs:
its EMA weights as a one-expert base-only model, the first N held-out prompts
at 32 px (16 Heun steps), read back by the analyser; "colour-in-named-cell"
counts an object of the asked colour in the cell the caption names.

    .venv/bin/python scripts/peek_checkpoint.py RUN_DIR PHASE N     # e.g. runs/shapes base_root 32
Writes the images to /tmp/peek.png.
"""
import sys, json, torch, numpy as np
from pathlib import Path
from ediffi.train import *
from ediffi.config import ModelConfig, StageConfig
from ediffi.model import experts_for, save_expert, load_model
from ediffi.pipeline import GenerationRequest, generate_batch
from ediffi.world import heldout_scenes, heldout_prompts, analyse, score
torch.set_num_threads(1)
run = Path(sys.argv[1]); phase = sys.argv[2]; n = int(sys.argv[3])
cfg = train_config_from_overrides(json.load(open("configs/shapes-train.json")))
enc = Encoders(run / "encoders_model", encoders_config(cfg))
net_cfg = network_config(cfg, "base", enc)
import shutil, tempfile; out = Path(tempfile.mkdtemp(prefix="peek-model-"))
shutil.copytree(run / "encoders_model" / "encoders", out / "encoders")
ex = experts_for((), 1, "base", net_cfg, "stages/base")
net = EDMDenoiser(net_cfg, 32); net.load_state_dict(torch.load(run/"checkpoints"/f"{phase}.pt", weights_only=False)["ema"])
save_expert(net, out / ex[0].weights)
ModelConfig(name="peek", encoders=encoders_config(cfg), stages=[StageConfig(name="base", image_size=32, experts=ex)]).save(out)
model = load_model(out)
scenes = heldout_scenes(n); prompts = heldout_prompts(n)
reqs = [GenerationRequest(prompt=p, seed=s, steps=16) for p, s in prompts]
imgs = [i[0] for i in generate_batch(model, reqs)]
o = on = p_ok = pn = c = 0
for im, sc in zip(imgs, scenes):
    s = score(analyse(np.asarray(im)), sc)
    on += len(s["objects"]); o += sum(x["attr_ok"] for x in s["objects"])
    named = [x for x in s["objects"] if x["position_named"]]; pn += len(named); p_ok += sum(x["cell_ok"] for x in named)
    c += s["count_ok"]
cc = cn = 0
for im, sc in zip(imgs, scenes):
    a = analyse(np.asarray(im))
    for ob in sc.objects:
        if ob.position_named:
            cn += 1; cc += any(d.color == ob.color and d.cell == ob.cell for d in a.objects)
print(f"colour-in-named-cell {cc/max(cn,1):.0%}")
print(f"{phase}: object {o/on:.0%} position {p_ok/max(pn,1):.0%} count {c/n:.0%} (n={n}, 32px base only, 16 heun)")
from PIL import Image
grid = Image.new("RGB", (8*34, ((len(imgs)+7)//8)*34), "white")
for i, im in enumerate(imgs): grid.paste(im, ((i%8)*34, (i//8)*34))
grid.resize((grid.width*3, grid.height*3), Image.NEAREST).save("/tmp/peek.png")
for (p, _), im, sc in list(zip(prompts, imgs, scenes))[:16]:
    a = analyse(np.asarray(im)); print(p, "|", [(d.color, d.shape, tuple(round(v) for v in d.centroid)) for d in a.objects])
