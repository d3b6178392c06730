"""cpc.py: patch grid, causal context network, InfoNCE over the grid, train step, resume, bad input, end to end."""
import json
import math
import os

import torch

from util import expect_exit, free_port, random_init_knn
import common
import cpc
import knn_eval


def tiny_model(K=2, layers=2, width=2, seed=0):
    torch.manual_seed(seed)
    enc = common.build_backbone("patch_grid", backbone="resnet18", backbone_kwargs={"width": width, "small_stem": True},
                                patch=8, stride=4)
    return cpc.CPC(enc, 8, layers, K)


# ================================================================================================================
# The patch grid (common.patch_grid, common.PatchGridEncoder)
# ================================================================================================================
def test_patch_grid_size_overlap_and_exact_pixels():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    p = common.patch_grid(x, 8, 4)
    assert p.shape == (2, 7, 7, 3, 8, 8)  # (32 - 8) / 4 + 1 = 7 patches a side
    for n, i, j in [(0, 0, 0), (1, 3, 5), (0, 6, 6), (1, 6, 0)]:
        assert torch.equal(p[n, i, j], x[n, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8])
    assert torch.equal(p[:, 2, 3, :, 4:], p[:, 3, 3, :, :4])  # the patch below shares its top half
    assert torch.equal(p[:, 2, 3, :, :, 4:], p[:, 2, 4, :, :, :4])  # the patch to the right shares its left half
    assert common.patch_grid(torch.zeros(1, 3, 256, 256), 64, 32).shape[1:3] == (7, 7)  # the papers' grid
    assert common.patch_grid(torch.zeros(1, 3, 32, 32), 16, 16).shape[1:3] == (2, 2)  # no overlap


def test_patch_grid_encoder_is_the_mean_of_the_backbone_over_patches_and_loads_back(tmp_path):
    """An image in, a vector out: the backbone on every patch, mean-pooled. A cpc.py-style checkpoint rebuilds it
    with common.load_encoder (so knn_eval.py and visualize.py work on it)."""
    torch.manual_seed(0)
    kwargs = {"backbone": "resnet18", "backbone_kwargs": {"width": 2, "small_stem": True}, "patch": 8, "stride": 4}
    enc = common.build_backbone("patch_grid", **kwargs).eval()
    x = torch.randn(3, 3, 32, 32)
    h = enc(x)
    assert h.shape == (3, enc.feature_dim) and enc.feature_dim == 16
    patches = common.patch_grid(x, 8, 4)
    ref = torch.stack([torch.stack([enc.backbone(patches[:, i, j]) for j in range(7)]) for i in range(7)]).mean((0, 1))
    assert torch.allclose(h, ref, atol=1e-5)
    common.save_checkpoint(str(tmp_path / "c.pt"), backbone={"name": "patch_grid", "kwargs": kwargs},
                           encoder=enc.state_dict())
    back, _ = common.load_encoder(str(tmp_path / "c.pt"))
    assert isinstance(back, common.PatchGridEncoder) and torch.allclose(back(x), h, atol=1e-6)
    assert "patch_grid" not in common.BACKBONES  # not a --backbone choice of the other scripts


def test_cpc_augment_shapes_and_patches_augmented_independently():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    p = cpc.cpc_augment(x, 32, 8, 4, min_scale=1.0)
    assert p.shape == (4, 7, 7, 3, 8, 8) and p.dtype == torch.float32
    # the shared half of two neighbours is no longer identical: each patch got its own colour distortion / flip
    assert not torch.allclose(p[:, 2, 3, :, 4:], p[:, 3, 3, :, :4], atol=1e-3)


# ================================================================================================================
# The context network: c at row i sees rows <= i only
# ================================================================================================================
def test_masked_conv_mask_and_context_receptive_field():
    """Changing z in rows > i leaves c in rows <= i unchanged; changing row i, or a row above within reach, changes
    c at row i. Checked on the context network and through the whole model (encoder in eval mode)."""
    torch.manual_seed(0)
    conv = cpc.MaskedConv2d(4)
    assert conv.mask[0, 0].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    net = cpc.ContextNetwork(6, 5, layers=3)
    z = torch.randn(2, 6, 7, 7)
    c = net(z)
    assert c.shape == (2, 5, 7, 7)
    for i in range(7):
        below = z.clone()
        below[:, :, i + 1:] = torch.randn_like(below[:, :, i + 1:])
        assert torch.equal(net(below)[:, :, :i + 1], c[:, :, :i + 1]), i  # rows > i: not seen
        for r in range(max(0, i - 3), i + 1):  # 3 blocks: rows i-3 .. i are seen
            above = z.clone()
            above[:, :, r, 3] += 1.0
            assert not torch.allclose(net(above)[:, :, i, 3], c[:, :, i, 3]), (i, r)
    # the same through g_enc + g_ar: pixels below row i's patches do not reach row i's context
    model = tiny_model(K=1, layers=3).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    model.context.register_forward_hook(lambda m, inp, out: feats.__setitem__("c", out))
    with torch.no_grad():
        model(common.patch_grid(x, 8, 4))
        c0 = feats["c"]
        y = x.clone()
        y[:, :, 20:] = torch.randn_like(y[:, :, 20:])  # pixel rows 20+ lie in patch rows >= 4 (rows 4i .. 4i+7)
        model(common.patch_grid(y, 8, 4))
        assert torch.equal(feats["c"][:, :, :4], c0[:, :, :4]) and not torch.allclose(feats["c"][:, :, 4:], c0[:, :, 4:])


# ================================================================================================================
# Loss
# ================================================================================================================
def cpc_loss_reference(z, z_hat):
    """Slow and obvious: one (k, n, i, j) at a time, the true patch z[n, i+k, j] among every patch of the batch."""
    K, N, G = z_hat.shape[0], z.shape[0], z.shape[1]
    everything = [z[m, a, b] for m in range(N) for a in range(G) for b in range(G)]
    per_k = []
    for k in range(1, K + 1):
        terms = []
        for n in range(N):
            for i in range(G - k):
                for j in range(G):
                    pred = z_hat[k - 1, n, i, j]
                    denom = sum(torch.exp(pred @ zm) for zm in everything)
                    terms.append(-torch.log(torch.exp(pred @ z[n, i + k, j]) / denom))
        per_k.append(sum(terms) / len(terms))
    return sum(per_k) / K


def test_cpc_loss_matches_slow_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    for N, G, D, K in [(1, 2, 3, 1), (2, 4, 5, 3), (3, 3, 4, 2)]:
        z = torch.randn(N, G, G, D, generator=g, dtype=torch.double).requires_grad_()
        z_hat = torch.randn(K, N, G, G, D, generator=g, dtype=torch.double).requires_grad_()
        got, acc = cpc.cpc_loss(z, z_hat)
        ref = cpc_loss_reference(z, z_hat)
        assert torch.allclose(got, ref, atol=1e-10), (N, G, D, K, got, ref)
        for a, b in zip(torch.autograd.grad(got, [z, z_hat]), torch.autograd.grad(ref, [z, z_hat])):
            assert torch.allclose(a, b, atol=1e-10)
        assert 0 <= acc <= 1


def test_model_and_loss_follow_the_device():
    """Every tensor the model and the loss create follows the input's device (checked on `meta`)."""
    model = tiny_model(K=3).to("meta")
    z, z_hat = model(torch.zeros(2, 7, 7, 3, 8, 8, device="meta"))
    assert z.shape == (2, 7, 7, 16) and z_hat.shape == (3, 2, 7, 7, 16)
    loss, acc = cpc.cpc_loss(z, z_hat, torch.cat([z, z]), first=2)
    assert loss.device.type == acc.device.type == "meta"


def test_cpc_loss_perfect_and_chance_and_sharded_like_torchrun():
    """Predictions equal to their (orthogonal, large) targets: loss ~0, accuracy 1; all-equal vectors: log of the
    number of candidates. Under torchrun each rank scores its predictions against the gathered candidates: the mean
    of the per-rank losses is the loss of the global batch."""
    N, G, K = 2, 3, 2
    z = 30 * torch.eye(N * G * G).view(N, G, G, -1)  # every patch its own direction
    z_hat = torch.zeros(K, N, G, G, N * G * G)
    for k in range(1, K + 1):
        z_hat[k - 1, :, :G - k] = z[:, k:]
    loss, acc = cpc.cpc_loss(z, z_hat)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    loss, _ = cpc.cpc_loss(torch.ones(N, G, G, 4), torch.ones(K, N, G, G, 4))
    assert abs(loss.item() - math.log(N * G * G)) < 1e-5
    torch.manual_seed(0)
    z, z_hat = torch.randn(4, 4, 4, 6), torch.randn(3, 4, 4, 4, 6)
    whole, _ = cpc.cpc_loss(z, z_hat)
    shards = [cpc.cpc_loss(z[r * 2:r * 2 + 2], z_hat[:, r * 2:r * 2 + 2], candidates=z, first=r * 2)[0] for r in (0, 1)]
    assert torch.allclose(sum(shards) / 2, whole, atol=1e-5)


# ================================================================================================================
# One update, resume, knn_eval on the checkpoint, bad input, end to end
# ================================================================================================================
def test_train_step_moves_every_part():
    autocast, scaler = common.setup_amp("off", torch.device("cpu"))
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(1)
    patches = cpc.cpc_augment(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), 32, 8, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc = cpc.train_step(model, patches, opt, sched, scaler, autocast)
    assert math.isfinite(loss) and 0 <= acc <= 1
    for part in ("encoder.backbone.conv1.weight", "context.inp.weight", "context.blocks.0.1.weight",
                 "predict.0.weight", "predict.1.weight"):
        assert not torch.equal(before[part], model.state_dict()[part]), part


def test_cpc_resume_continues_exactly_and_knn_eval_reads_the_checkpoint(tmp_path):
    """2 epochs in one go == 1 epoch, then --resume for the second: same losses, lr and weights. knn_eval.py
    evaluates the checkpoint unchanged (its encoder: a PatchGridEncoder)."""
    base = ["--data", "shapes", "--shapes-n", "64", "32", "--width", "2", "--batch-size", "16", "--pred-steps", "2",
            "--context-layers", "1", "--warmup-epochs", "1", "--device", "cpu", "--knn-every", "2",
            "--log-every", "1000"]
    cpc.main(base + ["--epochs", "2", "--out", str(tmp_path / "a")])
    cpc.main(base + ["--epochs", "1", "--out", str(tmp_path / "b")])
    s = cpc.main(["--resume", str(tmp_path / "b" / "last.pt"), "--epochs", "2"])
    m1, m2 = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b"))
    assert [r["epoch"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["lr"] - b["lr"]) < 1e-9, (a, b)
    c1, c2 = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("a", "b"))
    assert all(torch.allclose(c1["model"][k].float(), c2["model"][k].float(), atol=1e-4) for k in c1["model"])
    assert s["epochs"] == 2 and c2["method"] == "cpc" and c2["backbone"]["name"] == "patch_grid"
    assert c2["args"]["patch_size"] == 8 and c2["args"]["patch_stride"] == 4  # resolved defaults are saved
    enc, _ = common.load_encoder(str(tmp_path / "b" / "last.pt"))
    assert isinstance(enc, common.PatchGridEncoder)
    r = knn_eval.main(["--ckpt", str(tmp_path / "b" / "last.pt"), "--protocols", "knn", "--device", "cpu"])
    assert r["rows"][0]["protocol"] == "weighted kNN" and r["img_size"] == 32, r


def _gloo_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    z, z_hat = torch.randn(2, 3, 3, 4), torch.randn(2, 2, 3, 3, 4)  # this rank's patches and predictions
    cand = common.all_gather_with_grad(z)
    loss, _ = cpc.cpc_loss(z, z_hat, cand, first=rank * 2)
    torch.save({"z": z, "z_hat": z_hat, "loss": loss.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    # the whole script on this process group (common.setup_distributed joins it; finish() leaves it)
    cpc.main(["--data", "shapes", "--shapes-n", "64", "32", "--width", "2", "--batch-size", "16", "--epochs", "1",
              "--pred-steps", "2", "--context-layers", "1", "--device", "cpu", "--knn-every", "1",
              "--log-every", "1000", "--out", os.path.join(out_dir, "run")])


def test_torchrun_candidates_are_the_global_batch(tmp_path):
    """2 gloo processes: each rank's loss over the gathered patches is its share of the global-batch loss (their
    mean = cpc_loss of the concatenated batch); the script runs under torchrun and saves both ranks' RNG."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    whole, _ = cpc.cpc_loss(torch.cat([r0["z"], r1["z"]]), torch.cat([r0["z_hat"], r1["z_hat"]], 1))
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, whole, atol=1e-5)
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert summary["world_size"] == 2 and summary["knn_top1"] is not None
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4


def test_cpc_bad_input_errors(tmp_path):
    base = ["--data", "shapes", "--shapes-n", "64", "16", "--width", "2", "--device", "cpu", "--epochs", "1",
            "--batch-size", "16", "--out", str(tmp_path)]
    expect_exit(lambda: cpc.main(base + ["--patch-size", "40"]), "--patch-size 40", "does not fit", "32px")
    expect_exit(lambda: cpc.main(base + ["--patch-size", "8", "--patch-stride", "5"]), "--patch-stride 5",
                "does not fit")
    expect_exit(lambda: cpc.main(base + ["--pred-steps", "7"]), "--pred-steps 7", "7x7", "at most 6")
    expect_exit(lambda: cpc.main(base + ["--patch-size", "16", "--pred-steps", "3"]), "3x3", "at most 2")
    expect_exit(lambda: cpc.main(base + ["--pred-steps", "0"]), "--pred-steps")
    expect_exit(lambda: cpc.main(base + ["--context-layers", "0"]), "--context-layers")
    expect_exit(lambda: cpc.main(base + ["--crop-min-scale", "0"]), "--crop-min-scale")
    expect_exit(lambda: cpc.main(base + ["--epochs", "0"]), "--epochs")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, tmp_path / "s.pt")
    expect_exit(lambda: cpc.main(base + ["--resume", str(tmp_path / "s.pt")]), "simclr checkpoint")


def test_cpc_trains_on_shapes(tmp_path):
    """End to end on the synthetic shapes, on the CPU (60 steps): InfoNCE ends below chance log(N G^2) and the
    mean-pooled patch encoder's weighted kNN beats the same encoder at random init by at least 8 points and a
    random-init whole-image ResNet by at least 4 (measured, seed 0: 48.2% vs 31.4% and 36.0%; seeds 1 and 2: +20.2
    / +14.0 and +10.0 / +4.8 points, see docs/cpc.md)."""
    s = cpc.main(["--data", "shapes", "--shapes-n", "1920", "500", "--width", "4", "--epochs", "1",
                  "--batch-size", "32", "--lr", "0.08", "--device", "cpu", "--out", str(tmp_path),
                  "--log-every", "1000"])
    data = common.load_dataset("shapes", shapes_n=(1920, 500))
    torch.manual_seed(0)
    grid = common.knn_monitor(common.build_backbone("patch_grid", backbone="resnet18", patch=8, stride=4,
                                                    backbone_kwargs={"width": 4, "small_stem": True}), data,
                              torch.device("cpu"))
    whole = random_init_knn(data, width=4, small_stem=True)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    print(f"    loss {rows[-1]['loss']:.3f} (chance {math.log(32 * 49):.3f}); kNN {s['knn_top1']:.1f}% vs random init "
          f"{grid:.1f}% (patch grid), {whole:.1f}% (whole image)")
    assert rows[-1]["loss"] < math.log(32 * 49), rows
    assert s["knn_top1"] > grid + 8 and s["knn_top1"] > whole + 4, (s["knn_top1"], grid, whole)
