"""dino.py: the DINO loss, center, schedules, multi-crop, the ViT backbone of common.py, resume, bad input,
end to end on shapes; visualize.py attention."""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from util import expect_exit, free_port, random_init_knn
import common
import dino


# ================================================================================================================
# Loss and center
# ================================================================================================================
def dino_loss_reference(s, t, c, tau_s, tau_t):
    """Slow and obvious: every (teacher crop g, student crop v != g) pair, every image, every output k."""
    G, V, N, K = t.shape[0], s.shape[0], s.shape[1], s.shape[2]
    total, pairs = 0.0, 0
    for g in range(G):
        for v in range(V):
            if v == g:
                continue
            ce = 0.0
            for n in range(N):
                p_t = torch.exp((t[g, n] - c) / tau_t) / torch.exp((t[g, n] - c) / tau_t).sum()
                log_p_s = s[v, n] / tau_s - torch.logsumexp(s[v, n] / tau_s, 0)
                ce = ce - sum(p_t[k].detach() * log_p_s[k] for k in range(K))
            total, pairs = total + ce / N, pairs + 1
    return total / pairs


def test_dino_loss_matches_double_loop_values_and_student_only_gradients():
    g = torch.Generator().manual_seed(0)
    for V, G, N, K in [(2, 2, 1, 3), (4, 2, 3, 5), (6, 2, 4, 7)]:
        s = (torch.randn(V, N, K, generator=g, dtype=torch.double) * 2).requires_grad_()
        t = (torch.randn(G, N, K, generator=g, dtype=torch.double) * 2).requires_grad_()
        c = torch.randn(1, K, generator=g, dtype=torch.double)
        got = dino.dino_loss(s, t, c, 0.1, 0.04)
        ref = dino_loss_reference(s, t, c[0], 0.1, 0.04)
        assert torch.allclose(got, ref, atol=1e-10), (V, N, K, got, ref)
        gs, = torch.autograd.grad(got, s)
        gs_ref, = torch.autograd.grad(ref, s)
        assert torch.allclose(gs, gs_ref, atol=1e-10)
        got = dino.dino_loss(s, t, c, 0.1, 0.04)
        got.backward()
        assert t.grad is None and s.grad is not None  # nothing flows back to the teacher
    # the loss does not pair a global crop with itself: a student equal to the teacher on crop g only still pays
    t = torch.randn(2, 3, 4)
    s = torch.cat([t, torch.randn(1, 3, 4)])
    assert dino.dino_loss(s, t, torch.zeros(4), 1.0, 1.0) > 0.1


def test_update_center_is_an_ema_of_the_teacher_batch_mean():
    t = torch.randn(2, 5, 8)
    c = torch.randn(1, 8)
    new = dino.update_center(c, t, 0.9)
    assert new.shape == (1, 8)
    assert torch.allclose(new, 0.9 * c + 0.1 * t.reshape(10, 8).mean(0, keepdim=True), atol=1e-6)
    assert torch.equal(dino.update_center(c, t, 1.0), c)  # momentum 1: no centering
    # on the meta device (every tensor follows its inputs' device)
    assert dino.update_center(c.to("meta"), t.to("meta"), 0.9).device.type == "meta"
    assert dino.dino_loss(torch.randn(4, 5, 8, device="meta"), t.to("meta"), c.to("meta"), 0.1, 0.04).device.type \
        == "meta"


def _center_worker(rank, world, port, t, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = t.shape[1] // world
    c = dino.update_center(torch.zeros(1, t.shape[-1]), t[:, rank * n:(rank + 1) * n], 0.9, world)
    torch.save(c, os.path.join(out, f"center{rank}.pt"))
    dist.destroy_process_group()


def test_center_is_all_reduced_under_torchrun(tmp_path):
    """Two processes with half the batch each get the center of one process with the whole batch."""
    import torch.multiprocessing as mp
    t = torch.randn(2, 8, 6)
    mp.spawn(_center_worker, args=(2, free_port(), t, str(tmp_path)), nprocs=2, join=True)
    expected = dino.update_center(torch.zeros(1, 6), t, 0.9)
    for r in range(2):
        assert torch.allclose(torch.load(tmp_path / f"center{r}.pt"), expected, atol=1e-6)


def test_teacher_entropy_is_log_k_for_uniform_and_zero_for_one_hot():
    K = 16
    assert abs(dino.teacher_entropy(torch.zeros(2, 3, K), torch.zeros(K), 0.04) - torch.log(torch.tensor(K * 1.0))) \
        < 1e-5
    one_hot = F.one_hot(torch.arange(3), K).float()[None].expand(2, 3, K) * 100
    assert dino.teacher_entropy(one_hot, torch.zeros(K), 0.04) < 1e-6


# ================================================================================================================
# Schedules
# ================================================================================================================
def test_schedules_first_and_last_steps():
    T = 50
    m = [dino.cosine_schedule(s, T, 0.996, 1.0) for s in range(T)]
    assert m[0] == 0.996 and abs(m[-1] - 1.0) < 1e-12 and all(a <= b for a, b in zip(m, m[1:]))
    wd = [dino.cosine_schedule(s, T, 0.04, 0.4) for s in range(T)]
    assert abs(wd[0] - 0.04) < 1e-12 and abs(wd[-1] - 0.4) < 1e-12 and abs(wd[(T - 1) // 2] - 0.22) < 0.02
    temps = [dino.teacher_temp_at(e, 0.04, 0.07, 30) for e in range(100)]
    assert temps[0] == 0.04 and abs(temps[29] - 0.07) < 1e-12 and temps[-1] == 0.07
    assert abs(temps[1] - (0.04 + 0.03 / 29)) < 1e-12  # np.linspace(0.04, 0.07, 30) as the reference
    assert dino.teacher_temp_at(0, 0.04, 0.07, 0) == 0.07  # no warm-up


# ================================================================================================================
# Defaults that follow the backbone
# ================================================================================================================
def resolved(*argv, img_size=32):
    _, args = dino.get_args(list(argv))
    line = dino.resolve_defaults(args, img_size)
    return args, line


RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "weight_decay_end", "global_scale", "local_scale", "teacher_temp",
               "warmup_teacher_temp_epochs", "head_bn")


def test_convnets_get_the_reference_readme_recipe_and_the_vit_the_papers_unless_given():
    """ResNet and AlexNet: the reference README's convnet line (SGD lr 0.03, weight decay 1e-4 throughout, global
    crops 0.14-1, local crops 0.05-0.14; main_dino.py's teacher temperature 0.04, no warm-up). ViT: the paper's
    (AdamW lr 5e-4, weight decay 0.04 -> 0.4, crops 0.4-1 and 0.05-0.4, teacher temperature 0.04 -> 0.07 over 30
    epochs). Written into args; flags given on the command line win; the lr follows the optimiser."""
    convnet = {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4,
               "global_scale": [0.14, 1.0], "local_scale": [0.05, 0.14], "teacher_temp": 0.04,
               "warmup_teacher_temp_epochs": 0, "head_bn": "on"}
    for argv in ([], ["--backbone", "resnet18"], ["--backbone", "resnet50"], ["--backbone", "alexnet"]):
        args, line = resolved(*argv)
        assert {k: getattr(args, k) for k in RECIPE_KEYS} == convnet, argv
        assert "convnet recipe: sgd lr 0.03" in line and "given" not in line, line
    args, line = resolved("--backbone", "vit_tiny", "--epochs", "300")
    assert {k: getattr(args, k) for k in RECIPE_KEYS} == {
        "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "global_scale": [0.4, 1.0],
        "local_scale": [0.05, 0.4], "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30, "head_bn": "off"}
    assert "ViT recipe: adamw lr 0.0005" in line and resolved("--backbone", "vit_tiny")[0].warmup_teacher_temp_epochs \
        == 30 and resolved("--backbone", "vit_tiny", "--epochs", "10")[0].warmup_teacher_temp_epochs == 3
    args, line = resolved("--backbone", "resnet18", "--optimizer", "adamw", "--weight-decay-end", "0.4",
                          "--local-scale", "0.05", "0.4", "--teacher-temp", "0.07")
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end, args.global_scale, args.local_scale,
            args.teacher_temp) == ("adamw", 5e-4, 1e-4, 0.4, [0.14, 1.0], [0.05, 0.4], 0.07)
    assert "(given: --optimizer, --weight-decay-end, --local-scale, --teacher-temp)" in line, line
    args, _ = resolved("--backbone", "vit_tiny", "--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "0",
                       "--warmup-teacher-temp-epochs", "0")
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end, args.warmup_teacher_temp_epochs) == \
        ("sgd", 0.1, 0.0, 0.4, 0)
    assert resolved("--optimizer", "lars")[0].lr == dino.BASE_LR["lars"]


def test_the_optimizer_of_a_run_follows_the_recipe_and_an_old_checkpoint_resumes_with_adamw(tmp_path):
    """One step of dino.main with the default ResNet builds SGD (its checkpoint keeps the resolved recipe); a
    checkpoint written before --optimizer existed was trained with AdamW, and --resume keeps it."""
    dino.main(TINY + ["--epochs", "1", "--knn-every", "5", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    group = ckpt["optimizer"]["param_groups"][0]
    assert "momentum" in group and "betas" not in group and abs(group["initial_lr"] - 0.03 * 32 / 256) < 1e-12
    assert {k: ckpt["args"][k] for k in ("optimizer", "lr", "weight_decay_end", "global_scale")} == \
        {"optimizer": "sgd", "lr": 0.03, "weight_decay_end": 1e-4, "global_scale": [0.14, 1.0]}
    parser, args = dino.get_args([])
    saved = {"lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4, "global_scale": [0.4, 1.0]}
    args = common.merge_resume_args(parser, [], args, saved)
    dino.upgrade_checkpoint_args(args, saved)
    dino.resolve_defaults(args, 32)
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end) == ("adamw", 5e-4, 0.04, 0.4)
    _, args = dino.get_args([])
    dino.upgrade_checkpoint_args(args, {"optimizer": "sgd"})
    assert args.optimizer is None


# ================================================================================================================
# Augmentations and model
# ================================================================================================================
def test_multi_crop_shapes_and_solarize():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    g, loc = dino.multi_crop(x, 32, 16, 3)
    assert g.shape == (10, 3, 32, 32) and loc.shape == (15, 3, 16, 16) and g.dtype == torch.float32
    assert dino.multi_crop(x, 32, 16, 0)[1] is None
    model = dino.DINO(common.build_backbone("resnet18", width=2, small_stem=True), 12, 16, 8)
    assert model(g, loc).view(-1, 5, 12).shape == (5, 5, 12)  # 2 global + 3 local crops of 5 images
    # the head's last layer: unit-norm rows (weight norm with fixed g = 1), only its direction v is trained
    w = model.head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(12), atol=1e-5)
    assert [n for n, p in model.head.named_parameters() if not p.requires_grad] == \
        ["last_layer.parametrizations.weight.original0"]
    y = torch.rand(4, 3, 6, 6)
    assert torch.equal(common.solarize(y, p=0.0), y)
    assert torch.equal(common.solarize(y, p=1.0), torch.where(y >= 0.5, 1 - y, y))


def _last_block_by_hand(enc, x, attn):
    """The ViT's [CLS] output with the last block's attention weights `attn` (N, heads, L, L) applied by hand."""
    block, mha = enc.encoder.layers[-1], enc.encoder.layers[-1].self_attention
    inp = enc.encoder.layers[:-1](enc.tokens(x))
    N, L, D = inp.shape
    v = F.linear(block.ln_1(inp), mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:])  # values (N, L, D)
    v = v.view(N, L, mha.num_heads, D // mha.num_heads).transpose(1, 2)  # (N, heads, L, D / heads)
    y = inp + mha.out_proj((attn @ v).transpose(1, 2).reshape(N, L, D))
    return enc.encoder.ln(y + block.mlp(block.ln_2(y)))[:, 0]


def test_vit_tiny_encodes_at_32_and_224_px_and_load_encoder_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    for size, patch in [(32, 4), (224, 16)]:
        args = argparse.Namespace(backbone="vit_tiny", width=8, no_sobel=False)
        kw = common.backbone_kwargs(args, size)
        assert kw == {"img_size": size, "patch_size": patch}
        enc = common.build_backbone("vit_tiny", **kw).eval()
        assert enc.feature_dim == 192 and len(enc.encoder.layers) == 12
        assert enc.encoder.layers[0].self_attention.num_heads == 3
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            h = enc(x)
            assert h.shape == (2, 192)
            assert enc(torch.randn(2, 3, size // 2, size // 2)).shape == (2, 192)  # a local crop
            attn = enc.last_attention(x)
        n = (size // patch) ** 2 + 1
        assert attn.shape == (2, 3, n, n) and torch.allclose(attn.sum(-1), torch.ones(2, 3, n), atol=1e-5)
        assert torch.allclose(_last_block_by_hand(enc, x, attn), h, atol=1e-4)  # the weights forward uses
        path = str(tmp_path / f"vit{size}.pt")
        common.save_checkpoint(path, method="dino", backbone={"name": "vit_tiny", "kwargs": kw},
                               encoder=enc.state_dict())
        enc2, _ = common.load_encoder(path)
        with torch.no_grad():
            assert torch.equal(enc2(x), h)
    assert common.vit_patch_size(64) == 4 and common.vit_patch_size(128) == 8 and common.vit_patch_size(96) == 8


def test_dino_vit_tiny_one_epoch_then_attention_maps(tmp_path):
    """dino.py with --backbone vit_tiny (local crops at 16 px through the interpolated position embedding); the
    checkpoint's encoder is the teacher's ViT, which load_encoder rebuilds and visualize.py attention draws."""
    import visualize
    s = dino.main(["--data", "shapes", "--shapes-n", "16", "8", "--backbone", "vit_tiny", "--batch-size", "8",
                   "--epochs", "1", "--local-crops", "1", "--out-dim", "32", "--head-hidden", "32", "--bottleneck",
                   "16", "--device", "cpu", "--knn-every", "1", "--log-every", "1000", "--out", str(tmp_path)])
    enc, ckpt = common.load_encoder(str(tmp_path / "last.pt"))
    assert isinstance(enc, common.ViT) and ckpt["backbone"]["kwargs"] == {"img_size": 32, "patch_size": 4}
    teacher_enc = {k[len("encoder."):]: v for k, v in ckpt["teacher"].items() if k.startswith("encoder.")}
    assert all(torch.equal(teacher_enc[k], v) for k, v in enc.state_dict().items())
    assert s["knn_top1"] is not None
    path = visualize.main(["attention", "--ckpt", str(tmp_path / "last.pt"), "--n", "2", "--device", "cpu", "--out",
                           str(tmp_path)])
    assert path.endswith("attention.png") and os.path.getsize(path) > 1000


# ================================================================================================================
# Training: resume, bad input, end to end
# ================================================================================================================
TINY = ["--data", "shapes", "--shapes-n", "96", "32", "--width", "4", "--batch-size", "32", "--device", "cpu",
        "--local-crops", "2", "--out-dim", "64", "--head-hidden", "64", "--bottleneck", "16", "--knn-every", "1",
        "--log-every", "1000"]


def test_dino_resume_continues_exactly(tmp_path):
    """2 epochs in one go == a run stopped right after epoch 1's checkpoint, then --resume (losses, entropies, lr,
    momentum, student, teacher with its center). The schedules depend on --epochs, so the stopped run has 2 too."""
    d1, d2 = str(tmp_path / "a"), str(tmp_path / "b")
    dino.main(TINY + ["--epochs", "2", "--out", d1])

    class Stop(Exception):
        pass
    save = common.save_training_checkpoint

    def save_and_stop(*a, **kw):
        save(*a, **kw)
        raise Stop
    common.save_training_checkpoint = save_and_stop
    try:
        dino.main(TINY + ["--epochs", "2", "--out", d2])
    except Stop:
        pass
    finally:
        common.save_training_checkpoint = save
    assert torch.load(os.path.join(d2, "last.pt"), weights_only=False)["epoch"] == 1
    s = dino.main(["--resume", os.path.join(d2, "last.pt")])
    m1 = [json.loads(x) for x in open(os.path.join(d1, "metrics.jsonl"))]
    m2 = [json.loads(x) for x in open(os.path.join(d2, "metrics.jsonl"))]
    assert [r["epoch"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        for k in ("loss", "teacher_entropy", "kl", "lr", "momentum", "teacher_temp", "knn_top1"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a, b)
    c1, c2 = (torch.load(os.path.join(d, "last.pt"), weights_only=False) for d in (d1, d2))
    for key in ("model", "teacher", "encoder"):
        assert all(torch.allclose(c1[key][k].float(), c2[key][k].float(), atol=1e-5) for k in c1[key]), key
    assert c1["teacher"]["center"].abs().sum() > 0 and s["epochs"] == 2


def test_no_centering_collapses_to_one_dimension_on_shapes(tmp_path):
    """The paper's ablation (Fig. 7): sharpening without centering (--center-momentum 1 keeps the center at 0)
    makes the teacher's output collapse towards one dimension: its entropy stays low and the student-teacher KL
    falls towards 0; with centering the entropy rises and the KL stays clearly above. Without BatchNorm in the head,
    as the paper (with it, the BatchNorm centres too, and both runs looked alike after 16 steps), and with AdamW, the
    paper's optimiser for this experiment. Measured with this command (2 epochs of 8 steps, seeds 0-3, one thread,
    fp32, the 2-core AMD EPYC Zen 4): final entropy 0.84 0.19 0.12 0.25 vs 1.95 1.82 1.89 1.96 with centering
    (ratio <= 0.43); KL 0.263 0.084 0.056 0.153 vs 0.607 0.479 0.484 0.727 (ratio <= 0.43). With the ResNet's
    default SGD (lr 2e-2) the ratios were up to 0.50 and 0.60 (seed 0), too close to the 0.6 of the asserts."""
    rows = {}
    for cm in ("1", "0.9"):
        out = str(tmp_path / cm)
        dino.main(["--data", "shapes", "--shapes-n", "256", "32", "--width", "4", "--batch-size", "32", "--device",
                   "cpu", "--local-crops", "2", "--out-dim", "64", "--head-hidden", "64", "--bottleneck", "16",
                   "--knn-every", "10", "--log-every", "1000", "--epochs", "2", "--optimizer", "adamw", "--lr", "2e-2",
                   "--center-momentum", cm, "--head-bn", "off", "--out", out])
        rows[cm] = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-1]
    print(f"    no centering: entropy {rows['1']['teacher_entropy']:.2f} KL {rows['1']['kl']:.3f}; centering: "
          f"entropy {rows['0.9']['teacher_entropy']:.2f} KL {rows['0.9']['kl']:.3f}")
    assert rows["1"]["teacher_entropy"] < 0.6 * rows["0.9"]["teacher_entropy"], rows
    assert rows["1"]["kl"] < 0.6 * rows["0.9"]["kl"], rows


def test_dino_bad_input_errors(tmp_path):
    d = str(tmp_path)
    base = ["--data", "shapes", "--shapes-n", "64", "16", "--width", "4", "--device", "cpu", "--out", d]
    expect_exit(lambda: dino.main(base + ["--epochs", "0"]), "--epochs")
    expect_exit(lambda: dino.main(base + ["--batch-size", "128", "--epochs", "1"]), "larger than the dataset")
    expect_exit(lambda: dino.main(base + ["--teacher-temp", "0"]), "--teacher-temp")
    expect_exit(lambda: dino.main(base + ["--momentum-teacher", "1.5"]), "--momentum-teacher")
    expect_exit(lambda: dino.main(base + ["--center-momentum", "-0.1"]), "--center-momentum")
    expect_exit(lambda: dino.main(base + ["--local-crops", "-1"]), "--local-crops")
    expect_exit(lambda: dino.main(base + ["--local-scale", "0.4", "0.05"]), "--local-scale")
    expect_exit(lambda: dino.main(base + ["--out-dim", "0"]), "--out-dim")
    expect_exit(lambda: dino.main(base + ["--resume", os.path.join(d, "missing.pt")]), "checkpoint not found")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, os.path.join(d, "s.pt"))
    expect_exit(lambda: dino.main(base + ["--resume", os.path.join(d, "s.pt")]), "simclr checkpoint")
    expect_exit(lambda: dino.main(base + ["--student-temp", "-1"]), "--student-temp")
    # the command line (one error line, exit status 1): test_structure.py runs every script


SHAPES_COMMAND = ["--data", "shapes", "--shapes-n", "1000", "500", "--width", "4", "--epochs", "6", "--batch-size",
                  "64", "--local-crops", "2", "--out-dim", "256", "--head-hidden", "256", "--bottleneck", "64",
                  "--optimizer", "adamw", "--lr", "2e-2", "--weight-decay", "0.04", "--weight-decay-end", "0.4",
                  "--global-scale", "0.4", "1", "--local-scale", "0.05", "0.4", "--momentum-teacher", "0.9",
                  "--teacher-temp", "0.04", "--knn-every", "6", "--device", "cpu", "--log-every", "1000"]


def test_dino_trains_on_shapes(tmp_path):
    """End to end on the synthetic shapes (docs/dino.md, Results): the teacher's encoder classifies shapes better
    than a random-init encoder of the same architecture (weighted kNN), and the teacher has not collapsed (the
    student-teacher KL stays away from 0). The command names the AdamW recipe it was measured with (the ViT's
    optimiser, weight decay and crops; a ResNet's defaults are now the convnet recipe). Measured with this command
    on the 2-core AMD EPYC Zen 4, fp32, one thread: seed 0 35.6% vs 29.0% random init (+6.6), KL 0.52; with --seed 1
    and 2 (other images and weights) +8.8 and -5.2 points. The convnet defaults (SGD lr 0.03, weight decay 1e-4,
    crops 0.14-1 / 0.05-0.14; the same command without --optimizer, --lr, --weight-decay*, --*-scale) gave +4.8,
    +1.0, -12.6 at seeds 0-2, so the test keeps AdamW. This small budget is noisy (seed 2 would fail either way)."""
    s = dino.main(SHAPES_COMMAND + ["--out", str(tmp_path)])
    base = random_init_knn(common.load_dataset("shapes", shapes_n=(1000, 500)), width=4, small_stem=True)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    print(f"    kNN {s['knn_top1']:.1f}% vs random init {base:.1f}%; teacher entropy {rows[-1]['teacher_entropy']:.2f} "
          f"(log K = {torch.log(torch.tensor(256.0)):.2f}), KL {rows[-1]['kl']:.3f}")
    assert s["knn_top1"] > base + 3, (s["knn_top1"], base)
    assert rows[-1]["kl"] > 0.2, rows[-1]


# ================================================================================================================
# visualize.py attention
# ================================================================================================================
def test_visualize_attention_maps_and_one_error_line_for_a_resnet(tmp_path):
    import visualize
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 4, "depth": 2}
    enc = common.build_backbone("vit_tiny", **kw).eval()
    args = {"data": "shapes", "shapes_n": [24, 16], "seed": 0}
    x = torch.randn(3, 3, 32, 32)
    maps = visualize.cls_attention_maps(enc, x)
    attn = enc.last_attention(x)  # the [CLS] row of each head, without its own entry, as an 8x8 grid
    ref = attn[:, :, 0, 1:].reshape(3, 3, 8, 8)
    assert maps.shape == (3, 3, 8, 8) and torch.allclose(maps, ref / ref.amax((2, 3), keepdim=True), atol=1e-6)
    res = str(tmp_path / "resnet.pt")
    common.save_checkpoint(res, method="simclr", args=args, epoch=1,
                           backbone={"name": "resnet18", "kwargs": {"width": 4, "small_stem": True}},
                           encoder=common.build_backbone("resnet18", width=4, small_stem=True).state_dict(),
                           img_size=32, data="shapes")
    expect_exit(lambda: visualize.main(["attention", "--ckpt", res, "--device", "cpu", "--out", str(tmp_path)]),
                "need a ViT checkpoint", "resnet18")
