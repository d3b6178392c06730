"""moco.py: InfoNCE loss, momentum update, queue, split BatchNorm and shuffling BN, torchrun, resume, end to end."""
import copy
import json
import math
import os

import torch
import torch.nn.functional as F

from util import expect_exit, free_port, random_init_knn
import common
import moco


def tiny_model(splits=1, mlp=True, seed=0):
    torch.manual_seed(seed)
    model = moco.MoCo(common.build_backbone("resnet18", width=4, small_stem=True), 8, mlp=mlp)
    return moco.convert_split_batchnorm(model, splits) if splits > 1 else model


# ================================================================================================================
# Loss
# ================================================================================================================
def moco_loss_reference(q, k, queue, tau):
    """Slow and obvious: one query at a time, eq. 1 of the paper."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        pos = torch.exp(qi @ (k[i] / k[i].norm()) / tau)
        neg = sum(torch.exp(qi @ queue[j] / tau) for j in range(queue.shape[0]))
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def test_moco_loss_matches_per_query_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    for n, d, K, tau in [(1, 3, 1, 0.2), (4, 8, 16, 0.07), (7, 5, 12, 1.0)]:
        q = (torch.randn(n, d, generator=g, dtype=torch.double) * 3).requires_grad_()
        k = torch.randn(n, d, generator=g, dtype=torch.double)
        queue = F.normalize(torch.randn(K, d, generator=g, dtype=torch.double), dim=1)
        got = moco.moco_loss(q, k, queue, tau)
        ref = moco_loss_reference(q, k, queue, tau)
        assert torch.allclose(got, ref, atol=1e-10), (n, d, K, tau, got, ref)
        g1, = torch.autograd.grad(got, q)
        g2, = torch.autograd.grad(ref, q)
        assert torch.allclose(g1, g2, atol=1e-10), (g1 - g2).abs().max()


def test_moco_loss_positive_is_column_0():
    """All logits equal -> log(1 + K); the positive far above the queue -> ~0; a query equal to a queue key and
    orthogonal to its positive -> large."""
    q = torch.ones(3, 4)
    assert abs(moco.moco_loss(q, q.clone(), F.normalize(torch.ones(5, 4), dim=1), 0.2).item() - math.log(6)) < 1e-5
    q, queue = torch.eye(4)[:2], torch.eye(4)[2:]
    assert moco.moco_loss(q, q.clone(), queue, 0.05).item() < 1e-3
    assert moco.moco_loss(q, torch.eye(4)[2:], torch.eye(4)[:2], 0.05).item() > 10
    assert moco.instance_accuracy(q, q.clone(), queue) == 1.0
    assert moco.instance_accuracy(q, torch.eye(4)[2:], torch.eye(4)[:2]) == 0.0


# ================================================================================================================
# Momentum update, queue
# ================================================================================================================
def test_momentum_update_equation():
    model = tiny_model()
    key = moco.make_key_encoder(model)
    assert all(not p.requires_grad for p in key.parameters()) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        key.encoder.bn1.running_mean.fill_(3.0)
    k0 = [p.detach().clone() for p in key.parameters()]
    q0 = [p.detach().clone() for p in model.parameters()]
    moco.momentum_update(key, model, 0.9)
    for pk, a, b in zip(key.parameters(), k0, q0):
        assert torch.allclose(pk, 0.9 * a + 0.1 * b, atol=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), q0))  # f_q untouched
    assert torch.equal(key.encoder.bn1.running_mean, torch.full((4,), 3.0))  # buffers are not averaged
    moco.momentum_update(key, model, 0.0)
    assert all(torch.equal(pk, pq) for pk, pq in zip(key.parameters(), model.parameters()))


def test_queue_fifo_and_pointer_wraparound():
    queue = moco.Queue(6, 3)
    assert queue.keys.shape == (6, 3) and torch.allclose(queue.keys.norm(dim=1), torch.ones(6))
    assert torch.equal(moco.Queue(6, 3).keys, queue.keys)  # same seed, same start on every rank
    batches = [torch.full((2, 3), float(b)) for b in range(1, 5)]
    ptrs = []
    for b in batches:
        queue.push(b)
        ptrs.append(int(queue.ptr))
    assert ptrs == [2, 4, 0, 2]
    # batch 4 replaced the oldest one (batch 1); batches 2 and 3 are still there
    assert queue.keys[:, 0].tolist() == [4.0, 4.0, 2.0, 2.0, 3.0, 3.0]
    assert set(dict(queue.state_dict())) == {"keys", "ptr"}  # both saved in the checkpoint


# ================================================================================================================
# Split BatchNorm and shuffling BN
# ================================================================================================================
def test_split_batchnorm_is_batchnorm_per_split():
    torch.manual_seed(0)
    bn = moco.SplitBatchNorm(3, 4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    x = torch.randn(12, 3, 5, 5) * 2 + 1
    y = bn(x)
    means, vars_ = [], []
    for j in range(4):  # split j = images j, j+4, j+8
        xs = x[j::4]
        ref = F.batch_norm(xs, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        assert torch.allclose(y[j::4], ref, atol=1e-5)
        means.append(xs.mean((0, 2, 3)))
        vars_.append(xs.var((0, 2, 3), unbiased=True))
    assert torch.allclose(bn.running_mean, 0.1 * torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0), atol=1e-5)
    assert not torch.allclose(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), atol=1e-3)
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())  # same state as BatchNorm2d; eval mode is a plain BatchNorm
    bn.eval(), plain.eval()
    assert torch.allclose(bn(x), plain(x))
    # a converted network keeps its weights and its encoder loads into the plain backbone
    model = tiny_model()
    split = moco.convert_split_batchnorm(copy.deepcopy(model), 4)
    assert sum(isinstance(m, moco.SplitBatchNorm) for m in split.modules()) == 20
    enc = common.build_backbone("resnet18", width=4, small_stem=True)
    enc.load_state_dict(split.encoder.state_dict())
    x = torch.randn(8, 3, 16, 16)
    assert torch.allclose(enc.eval()(x), split.encoder.eval()(x), atol=1e-6)


def test_shuffled_keys_return_every_key_to_its_own_query():
    """Shuffle -> key encoder -> unshuffle gives image i's key in row i: for a per-image network the keys are
    f(x) exactly; for a split-BatchNorm network in training mode (its output depends on which images share a split)
    row i is the output of image i within the shuffled batch that the key encoder saw."""
    autocast, _ = common.setup_amp("off", torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    per_image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 6))
    k = moco.shuffled_keys(per_image, x, autocast)
    assert torch.allclose(k, F.normalize(per_image(x), dim=1), atol=1e-6)
    model = tiny_model(splits=4).train()
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    x = torch.randn(16, 3, 16, 16)
    k = moco.shuffled_keys(model, x, autocast)
    shuffled, out = seen[0]
    perm = [next(j for j in range(16) if torch.equal(shuffled[j], x[i])) for i in range(16)]  # x[i] = shuffled[perm[i]]
    assert perm != list(range(16))  # the key encoder saw the batch in another order
    assert torch.allclose(k, F.normalize(out[perm], dim=1), atol=1e-6)  # every key back with its own image
    assert not torch.allclose(k, F.normalize(model(x), dim=1), atol=1e-3)  # (unshuffled: other split statistics)


# ================================================================================================================
# One update as the reference
# ================================================================================================================
def test_train_step_as_the_reference():
    """Step 1: f_k's momentum step is a no-op (f_k = f_q), f_q moves, the queue's first N rows are the normalised
    keys f_k(view 2) (plain BatchNorm: the shuffle changes nothing) and the pointer moves by N. Step 2 starts with
    theta_k <- m theta_k + (1 - m) theta_q. --symmetric enqueues 2N keys."""
    autocast, scaler = common.setup_amp("off", torch.device("cpu"))
    model = tiny_model()
    key = moco.make_key_encoder(model)
    queue = moco.Queue(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(1)
    v1, v2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    expected = F.normalize(copy.deepcopy(model).train()(v2), dim=1).detach()
    q0 = [p.detach().clone() for p in model.parameters()]
    loss, acc = moco.train_step(model, key, queue, v1, v2, opt, sched, scaler, autocast, 0.2, 0.9)
    assert loss > 0 and 0 <= acc <= 1 and int(queue.ptr) == 8
    assert torch.allclose(queue.keys[:8], expected, atol=1e-5)
    assert all(torch.allclose(pk, a, atol=1e-6) for pk, a in zip(key.parameters(), q0))  # m a + (1 - m) a
    assert all(p.grad is None for p in key.parameters())
    q1 = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(q0, q1))
    moco.train_step(model, key, queue, v1, v2, opt, sched, scaler, autocast, 0.2, 0.9, symmetric=True)
    assert all(torch.allclose(pk, 0.9 * a + 0.1 * b, atol=1e-6) for pk, a, b in zip(key.parameters(), q0, q1))
    assert int(queue.ptr) == 24  # 8 + 2 x 8


# ================================================================================================================
# torchrun: keys gathered in rank order, shuffled across ranks; a whole run
# ================================================================================================================
def _gloo_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    autocast, _ = common.setup_amp("off", torch.device("cpu"))
    queue = moco.Queue(8, 3)
    queue.push(torch.full((2, 3), 10.0 + rank), world)  # rank 0's keys, then rank 1's
    queue.push(torch.full((2, 3), 20.0 + rank), world)
    torch.manual_seed(rank)  # different RNG on each rank: the permutation must come from rank 0
    x = torch.arange(8.0).view(4, 2) + 100 * rank  # rank r holds images 100r + ...
    seen = []
    per_image = torch.nn.Linear(2, 2)
    torch.nn.init.eye_(per_image.weight), torch.nn.init.zeros_(per_image.bias)
    per_image.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    k = moco.shuffled_keys(per_image, x, autocast, world, rank)
    torch.save({"queue": queue.keys, "ptr": int(queue.ptr), "k": k, "x": x, "seen": seen[0]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    # the whole script on this process group (common.setup_distributed joins it; finish() leaves it)
    moco.main(["--data", "shapes", "--shapes-n", "64", "32", "--width", "2", "--batch-size", "16", "--epochs", "1",
               "--device", "cpu", "--knn-every", "1", "--log-every", "1000", "--out", os.path.join(out_dir, "run")])


def test_torchrun_keys_gathered_in_rank_order_and_shuffled_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"] == r1["ptr"] == 0
    assert r0["queue"][:, 0].tolist() == [10, 10, 11, 11, 20, 20, 21, 21]
    for r in (r0, r1):  # every key is its own image's; the key encoder saw images of both ranks
        assert torch.allclose(r["k"], F.normalize(r["x"], dim=1))
    seen = torch.cat([r0["seen"], r1["seen"]])
    assert sorted(seen[:, 0].tolist()) == sorted(torch.cat([r0["x"], r1["x"]])[:, 0].tolist())  # one permutation
    assert (r0["seen"] >= 100).any() or (r1["seen"] < 100).any()
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert summary["world_size"] == 2 and summary["knn_top1"] is not None
    # the default K of 64 images under torchrun: one step's keys, the global batch of 16 (not the 4096 it was)
    assert ckpt["args"]["moco_k"] == 16 and len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    assert int(ckpt["queue"]["ptr"]) == 0


# ================================================================================================================
# Resume, bad input, end to end
# ================================================================================================================
def test_moco_resume_continues_exactly(tmp_path):
    """2 epochs in one go == 1 epoch, then --resume for the second: same losses, lr, query and key encoders, queue
    and pointer. (A 1-epoch warm-up gives both runs the same schedule in epoch 1.) The checkpoint loads in knn_eval /
    visualize (common.load_encoder)."""
    base = ["--data", "shapes", "--shapes-n", "96", "32", "--width", "2", "--batch-size", "16", "--moco-k", "80",
            "--bn-splits", "4", "--warmup-epochs", "1", "--device", "cpu", "--knn-every", "2", "--log-every", "1000"]
    moco.main(base + ["--epochs", "2", "--out", str(tmp_path / "a")])
    moco.main(base + ["--epochs", "1", "--out", str(tmp_path / "b")])
    s = moco.main(["--resume", str(tmp_path / "b" / "last.pt"), "--epochs", "2"])
    m1, m2 = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b"))
    assert [r["epoch"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["lr"] - b["lr"]) < 1e-9, (a, b)
    c1, c2 = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("a", "b"))
    for part in ("model", "key_model", "queue"):
        assert c1[part].keys() == c2[part].keys()
        assert all(torch.allclose(c1[part][k].float(), c2[part][k].float(), atol=1e-4) for k in c1[part]), part
    assert int(c2["queue"]["ptr"]) == (2 * 6 * 16) % 80  # 6 steps of 16 keys per epoch
    assert s["epochs"] == 2 and c2["method"] == "moco"
    enc, _ = common.load_encoder(str(tmp_path / "b" / "last.pt"))
    assert isinstance(enc, common.ResNet)


def test_defaults_follow_the_image_size_and_torchrun():
    """Below 96 px the CIFAR-10 demo's K, m and weight decay (on CIFAR-10's 50,000 images), from 96 px ImageNet's
    (on its 1,281,167); tau 0.2 (v2) or 0.07 (v1); 8 BatchNorm splits in one process, 1 under torchrun; given flags
    stay."""
    _, small = moco.get_args([])
    moco.resolve_defaults(small, 32, 1, 50000)
    assert (small.moco_k, small.moco_m, small.weight_decay, small.temperature, small.bn_splits) == \
        (4096, 0.99, 5e-4, 0.2, 8)
    _, large = moco.get_args(["--no-mlp", "--moco-m", "0.9"])
    moco.resolve_defaults(large, 224, 2, 1281167)
    assert (large.moco_k, large.moco_m, large.weight_decay, large.temperature, large.bn_splits) == \
        (65536, 0.9, 1e-4, 0.07, 1)


def test_default_queue_is_smaller_than_the_training_set():
    """K follows the number of training images: at most a tenth of them (the paper's K is 5% of ImageNet, the demo's
    8% of CIFAR-10), a multiple of the keys per step (the global batch, x2 with --symmetric; the same under torchrun,
    where every rank enqueues all ranks' keys), at least one step's. An Imagenette folder (9,469 images at 128 px) got
    65,536, its whole training set about 7 times. CIFAR-10 keeps the demo's 4096 at the batch sizes of docs/moco.md."""
    for argv, world in [([], 1), ([], 2), (["--batch-size", "384"], 2), (["--batch-size", "96", "--symmetric"], 2),
                        (["--batch-size", "64"], 1)]:
        _, args = moco.get_args(argv)
        moco.resolve_defaults(args, 128, world, 9469)
        per_step = args.batch_size * (2 if args.symmetric else 1)
        assert args.moco_k < 9469 / 2 and args.moco_k % per_step == 0 and args.moco_k >= per_step, (argv, args.moco_k)
        moco.check_sizes(args.moco_k, args.batch_size, args.symmetric, args.bn_splits, world, 9469)  # accepted
    assert moco.default_queue_size(128, 9469, 64) == 896 and moco.default_queue_size(128, 9469, 512) == 512
    for batch in (256, 512):
        _, args = moco.get_args(["--batch-size", str(batch)])
        moco.resolve_defaults(args, 32, 1, 50000)
        assert args.moco_k == 4096
    assert moco.default_queue_size(32, 50000, 384) == 3840  # 4096 is no multiple of 384: the multiple below
    assert moco.default_queue_size(224, 1281167, 256) == 65536 and moco.default_queue_size(32, 2000, 64) == 192
    _, given = moco.get_args(["--moco-k", "1024"])
    moco.resolve_defaults(given, 128, 1, 9469)
    assert given.moco_k == 1024


def test_queue_at_or_above_the_training_set_is_refused_unless_forced(tmp_path):
    """--moco-k >= the number of training images stops with one line naming both and --force-queue; forced, it
    runs. Without --moco-k the default fits (64 images, batch 16: one step's 16 keys)."""
    base = ["--data", "shapes", "--shapes-n", "64", "32", "--width", "2", "--device", "cpu", "--epochs", "1",
            "--batch-size", "16", "--bn-splits", "2", "--knn-every", "1", "--log-every", "1000"]
    expect_exit(lambda: moco.main(base + ["--moco-k", "64", "--out", str(tmp_path / "a")]), "--moco-k 64",
                "64 training images", "--force-queue")
    expect_exit(lambda: moco.main(base + ["--moco-k", "96", "--symmetric", "--out", str(tmp_path / "a")]),
                "--moco-k 96", "--force-queue")
    s = moco.main(base + ["--moco-k", "64", "--force-queue", "--out", str(tmp_path / "b")])
    assert s["epochs"] == 1 and torch.load(tmp_path / "b" / "last.pt", weights_only=False)["queue"]["keys"].shape[0] == 64
    moco.main(base + ["--out", str(tmp_path / "c")])
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=False)["args"]["moco_k"] == 16


def test_knn_monitor_and_knn_eval_read_the_backbone_or_the_head(tmp_path):
    """--knn-features head: the monitor reads the query network with its projection head, as the reference CIFAR-10
    demo (its ResNet's fc layer is the 128-d head), instead of the backbone's h; knn_eval --features head reads the
    same from the checkpoint (same top-1 as the monitor), --features backbone the backbone (same top-1 as a monitor
    of the backbone). Not for other methods' checkpoints, nor with the per-layer probes."""
    import knn_eval
    base = ["--data", "shapes", "--shapes-n", "96", "64", "--width", "2", "--device", "cpu", "--epochs", "1",
            "--batch-size", "16", "--moco-k", "32", "--moco-dim", "8", "--bn-splits", "2", "--log-every", "1000"]
    d = str(tmp_path)
    s = moco.main(base + ["--knn-features", "head", "--out", d])
    ckpt = torch.load(os.path.join(d, "last.pt"), weights_only=False)
    enc, _ = common.load_encoder(os.path.join(d, "last.pt"))
    model = moco.MoCo(enc, 8)
    model.load_state_dict(ckpt["model"])
    data = common.load_dataset("shapes", shapes_n=(96, 64))
    head = common.knn_monitor(model, data, torch.device("cpu"))
    backbone = common.knn_monitor(enc, data, torch.device("cpu"))
    assert s["knn_features"] == "head" and s["knn_top1"] == head, (s["knn_top1"], head, backbone)
    assert common.extract_features(model, data.test, torch.device("cpu")).shape == (64, 8)  # the 8-d head output
    ev = ["--ckpt", os.path.join(d, "last.pt"), "--protocols", "knn", "--device", "cpu"]
    r = knn_eval.main(ev + ["--features", "head", "--out", os.path.join(d, "head.json")])
    assert r["rows"][0]["top1"] == head and r["features"] == "head" and "projection-head" in r["encoder"]
    assert knn_eval.main(ev + ["--out", os.path.join(d, "bb.json")])["rows"][0]["top1"] == backbone
    assert moco.main(base + ["--out", os.path.join(d, "b")])["knn_features"] == "backbone"
    expect_exit(lambda: knn_eval.main(ev + ["--features", "head", "--protocols", "layers"]), "--protocols layers",
                "--features head")

    base = ["--data", "shapes", "--shapes-n", "64", "16", "--width", "4", "--device", "cpu", "--epochs", "1",
            "--batch-size", "16", "--out", str(tmp_path)]
    expect_exit(lambda: moco.main(base + ["--moco-k", "40"]), "--moco-k 40", "multiple", "16 keys")
    expect_exit(lambda: moco.main(base + ["--moco-k", "48", "--symmetric"]), "32 keys", "--symmetric")
    expect_exit(lambda: moco.main(base + ["--moco-m", "1"]), "--moco-m", "[0, 1)")
    expect_exit(lambda: moco.main(base + ["--moco-m", "-0.1"]), "--moco-m")
    expect_exit(lambda: moco.main(base + ["--moco-k", "0"]), "--moco-k")
    expect_exit(lambda: moco.main(base + ["--moco-k", "64", "--bn-splits", "3"]), "--bn-splits 3", "16 images")
    expect_exit(lambda: moco.main(base + ["--bn-splits", "0"]), "--bn-splits")
    expect_exit(lambda: moco.main(base + ["--temperature", "0"]), "--temperature")
    expect_exit(lambda: moco.main(base + ["--blur-prob", "2"]), "--blur-prob")
    expect_exit(lambda: moco.main(base + ["--epochs", "0"]), "--epochs")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, tmp_path / "s.pt")
    expect_exit(lambda: moco.main(base + ["--resume", str(tmp_path / "s.pt")]), "simclr checkpoint")


def test_moco_trains_on_shapes(tmp_path):
    """End to end on the synthetic shapes, on the CPU (the docstring's quick start): the InfoNCE loss ends below
    chance level log(1 + K) (all outputs equal, the collapse that --moco-m 0 reaches) and the encoder's weighted
    kNN beats a random-init encoder of the same architecture by at least 6 points (measured: 47.4% vs 35.6% with
    one thread, 49.6% with two; seeds 1 and 2: +5.2 and +9.8 points, see docs/moco.md). NOT ROBUST (re-measured on
    a Zen 4, fp32 NCHW, 2026-12-06): seed 0 gives 51.0% with two threads but 41.6% with one (+6.0, at the
    threshold); seeds 1 / 2 +10.8 / (not run); the default queue (K 192 here) +15.4 / +2.0 / +11.4; AdamW lr 1e-2 for
    6 epochs +13.8 / +8.4 / +3.2. A recipe with a margin that holds over seeds is still to be found."""
    s = moco.main(["--data", "shapes", "--shapes-n", "2000", "500", "--width", "4", "--epochs", "5",
                   "--batch-size", "64", "--optimizer", "sgd", "--lr", "1.0", "--moco-k", "512", "--knn-every", "5",
                   "--device", "cpu", "--out", str(tmp_path), "--log-every", "1000"])
    base = random_init_knn(common.load_dataset("shapes", shapes_n=(2000, 500)), width=4, small_stem=True)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    print(f"    loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} (chance {math.log(513):.3f}), instance acc "
          f"{[round(r['instance_acc'], 3) for r in rows]}; kNN {s['knn_top1']:.1f}% vs random init {base:.1f}%")
    assert rows[-1]["loss"] < math.log(1 + 512) - 0.1, rows
    assert s["knn_top1"] > base + 6, (s["knn_top1"], base)
