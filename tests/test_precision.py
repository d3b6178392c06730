"""Precision and memory layout: the `auto` rules on faked CPUs, the statement every test makes (tests/util.py
runs_at), and the bf16 / channels_last paths, forced, so they run on every CPU (bf16 is emulated where the CPU has
no native bf16: slow, so these runs are tiny).

Why the tolerances: bf16 keeps 8 significant bits, so rounding a number to bf16 changes it by up to u = 2^-8 = 0.39%
of its value. Under autocast every convolution and linear layer rounds its input and weight to bf16 and accumulates
in fp32, and the losses are computed in fp32 from the bf16 layer outputs. Over the L ~ 20 layers of a ResNet-18 the
independent roundings add up like a random walk, about sqrt(2 L) u ~ 2.5% of a feature; a loss that averages over
a batch moves much less than its worst feature. So a step-1 loss may differ from fp32 by a few tenths of a percent
and must differ by less than 2.5% (measured: see the test's docstring); an fp32 loss would agree to ~1e-6.
"""
import contextlib
import io
import json
import os

import torch

from util import precision, random_init_knn, run_script, runs_at
import byol
import common
import cpc
import deepcluster
import dino
import moco
import rotnet
import simclr

CPU = torch.device("cpu")


@contextlib.contextmanager
def fake_cpu(**capabilities):
    """torch.cpu.get_capabilities() answers as a CPU with these capabilities would (e.g. avx512_bf16=True)."""
    real = torch.cpu.get_capabilities
    torch.cpu.get_capabilities = lambda: {"avx2": True, **capabilities}
    try:
        yield
    finally:
        torch.cpu.get_capabilities = real


FAKE_CPUS = {  # name: (capabilities, auto precision, auto layout)
    "AVX2-only (Zen 3)": ({}, None, torch.contiguous_format),
    "AVX-512, no bf16 (Skylake-X)": ({"avx512_f": True}, None, torch.channels_last),
    "AVX-512 BF16 (Zen 4/5)": ({"avx512_f": True, "avx512_bf16": True}, torch.bfloat16, torch.channels_last),
    "AMX (Xeon Sapphire Rapids)": ({"avx512_f": True, "avx512_bf16": True, "amx_bf16": True}, torch.bfloat16,
                                   torch.channels_last),
}


# ================================================================================================================
# The `auto` rules, on every kind of CPU seen (capabilities faked)
# ================================================================================================================
@runs_at(None)  # tests the auto rules themselves
def test_auto_rules_on_faked_cpus():
    """--amp auto: bf16 on CPUs that compute bf16 natively (AVX-512 BF16, AMX), fp32 elsewhere; --channels-last
    auto: NHWC on CPUs with AVX-512, NCHW on AVX2-only ones; on/off/bf16 force them on any CPU."""
    for name, (caps, dtype, layout) in FAKE_CPUS.items():
        with fake_cpu(**caps):
            assert common.cpu_has_native_bf16() == (dtype is not None), name
            assert common.cpu_has_avx512() == (layout == torch.channels_last), name
            autocast, scaler = common.setup_amp("auto", CPU)
            assert autocast.dtype == dtype and not scaler.is_enabled(), name
            with autocast():
                assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == (dtype or torch.float32), name
            assert common.memory_format(CPU) == common.memory_format(CPU, "auto") == layout, name
            assert common.setup_amp("bf16", CPU)[0].dtype == torch.bfloat16
            assert common.setup_amp("off", CPU)[0].dtype is None
            assert common.memory_format(CPU, "on") == torch.channels_last
            assert common.memory_format(CPU, "off") == torch.contiguous_format
    with fake_cpu(bf16=True):  # an Arm CPU with BF16
        assert common.cpu_has_native_bf16() and common.setup_amp("auto", CPU)[0].dtype == torch.bfloat16
    assert common.memory_format(torch.device("cuda")) == torch.channels_last


@runs_at(None)
def test_auto_precision_on_cuda_follows_bf16_support():
    real = torch.cuda.is_bf16_supported
    try:
        for supported, dtype in [(True, torch.bfloat16), (False, torch.float16)]:
            torch.cuda.is_bf16_supported = lambda supported=supported: supported
            assert common.setup_amp("auto", torch.device("cuda"))[0].dtype == dtype
    finally:
        torch.cuda.is_bf16_supported = real


# ================================================================================================================
# Every test states its precision and layout, and is held to it
# ================================================================================================================
def test_auto_resolves_to_the_stated_precision_whatever_the_cpu():
    """In a test (this one states fp32 and NCHW, the default), `auto` is the stated setting on every CPU."""
    for name, (caps, _, _) in FAKE_CPUS.items():
        with fake_cpu(**caps):
            assert common.setup_amp("auto", CPU)[0].dtype is None, name
            assert common.memory_format(CPU, "auto") == torch.contiguous_format, name
            with precision("bf16", "on"):
                assert common.setup_amp("auto", CPU)[0].dtype == torch.bfloat16, name
                assert common.memory_format(CPU, "auto") == torch.channels_last, name


def test_a_test_that_runs_another_precision_than_it_states_fails(tmp_path):
    """This test states fp32/NCHW: asking for bf16 or channels_last fails it, in this process and in a script it
    starts (the same holds for runs_at(amp="bf16") and an explicit --amp off)."""
    for call, words in [(lambda: common.setup_amp("bf16", CPU), "states --amp off"),
                        (lambda: common.memory_format(CPU, "on"), "states --channels-last off")]:
        try:
            call()
        except AssertionError as e:
            assert words in str(e), e
        else:
            raise AssertionError("no failure")
    with precision("bf16", "on"):
        for call in (lambda: common.setup_amp("off", CPU), lambda: common.memory_format(CPU, "off")):
            try:
                call()
            except AssertionError:
                pass
            else:
                raise AssertionError("no failure")
    tiny = ["--data", "shapes", "--shapes-n", "16", "16", "--width", "2", "--batch-size", "16", "--epochs", "1",
            "--device", "cpu", "--out", str(tmp_path / "run")]
    r = run_script("simclr.py", *tiny, "--amp", "bf16")
    assert r.returncode != 0 and "states --amp off" in r.stderr, r.stderr[-2000:]


# ================================================================================================================
# bf16 on every CPU: the first step of every method, learning, compile, resume; channels_last
# ================================================================================================================
def _quiet(main, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


ONE_STEP = {  # one step on 32 shapes images: the epoch's loss is the loss of step 1
    "simclr": (simclr.main, ["--width", "4", "--batch-size", "32"]),
    "moco": (moco.main, ["--width", "4", "--batch-size", "32", "--moco-k", "32", "--bn-splits", "4",
                         "--shapes-n", "48", "32"]),  # a queue smaller than the training set (one step: drop_last)
    "byol": (byol.main, ["--width", "4", "--batch-size", "32"]),
    "dino": (dino.main, ["--width", "4", "--batch-size", "32", "--local-crops", "2", "--out-dim", "64",
                         "--head-hidden", "64", "--bottleneck", "16"]),
    "rotnet": (rotnet.main, ["--width", "4", "--batch-size", "32"]),
    "deepcluster": (deepcluster.main, ["--width", "4", "--batch-size", "32", "--k", "6", "--pca-dim", "16"]),
    "cpc": (cpc.main, ["--width", "4", "--batch-size", "32", "--pred-steps", "2", "--context-layers", "1"]),
}


def _first_loss(main, argv, out):
    _quiet(main, ["--data", "shapes", "--shapes-n", "32", "32", "--epochs", "1", "--device", "cpu", "--knn-every",
                  "1", "--log-every", "1000", "--out", out] + argv)
    return json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["loss"]


def test_bf16_first_step_loss_is_close_to_fp32_for_every_method(tmp_path):
    """Step 1 of every method, same seed and batch, --amp bf16 vs --amp off: a finite loss within 2.5% of fp32
    (module docstring). Measured: at most 0.38% on a Zen 4 with native bf16, 0.39% with bf16 emulated (oneDNN and
    ATen limited to AVX2); fp32 is the same on both to 6 digits."""
    for name, (main, argv) in ONE_STEP.items():
        l32 = _first_loss(main, argv, str(tmp_path / f"{name}-fp32"))
        with precision("bf16"):
            l16 = _first_loss(main, argv, str(tmp_path / f"{name}-bf16"))
        print(f"    {name}: step-1 loss fp32 {l32:.5f} bf16 {l16:.5f} ({100 * abs(l16 - l32) / abs(l32):.3f}%)")
        assert torch.isfinite(torch.tensor(l16)) and abs(l16 - l32) < 0.025 * abs(l32), (name, l32, l16)


@contextlib.contextmanager
def weight_update():
    """Records what a run changes: yields a dict whose "update" is, after the run, (final - initial) of every
    parameter the run's optimiser trains, as one flat vector (read from common.make_optimizer's arguments)."""
    real, seen, result = common.make_optimizer, {}, {}

    def spy(name, groups, lr):
        seen["params"] = [p for g in groups for p in g["params"]]
        seen["initial"] = [p.detach().clone() for p in seen["params"]]
        return real(name, groups, lr)
    common.make_optimizer = spy
    try:
        yield result
    finally:
        common.make_optimizer = real
    result["update"] = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(seen["params"], seen["initial"])])


COMPILE_RUN = ["--data", "shapes", "--shapes-n", "32", "32", "--backbone", "conv_stack", "--width", "2",
               "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--knn-every", "1", "--log-every", "1000",
               "--optimizer", "sgd"]  # one step


@runs_at(amp="bf16")
def test_bf16_compile_matches_eager(tmp_path):
    """--compile under bf16 trains the same model as eager bf16, to bf16 accuracy. The compiled model rounds at other
    points (fused kernels), so step 1's loss agrees to 2.5% (module docstring; fp32: 1e-4), and the weight update of
    step 1 may differ, but by less than bf16 itself changes it: |u_compiled - u_eager| < |u_eager - u_fp32|, where u
    is the change of all trained weights in step 1 (a wrong compiled gradient gives a difference of the size of u).
    (The encoder is the context encoder's conv stack, BatchNorm included, at width 2: it compiles in half the time of
    a ResNet-18, and an AlexNet cannot serve, as its dropout draws other masks when compiled. Measured with one
    thread on a Zen 4 with native bf16, seeds 0 / 1 / 2: |u_compiled - u_eager| = 0.058 / 0.055 / 0.052 x |u_eager|,
    |u_eager - u_fp32| = 0.147 / 0.116 / 0.109 x; step-1 losses within 0.03% of each other.)"""
    runs = {}
    for name, amp, flags in [("fp32", "off", []), ("eager", "bf16", []), ("compiled", "bf16", ["--compile"])]:
        with precision(amp), weight_update() as u:
            _quiet(simclr.main, COMPILE_RUN + flags + ["--out", str(tmp_path / name)])
        runs[name] = (json.loads(open(tmp_path / name / "metrics.jsonl").readline())["loss"], u["update"])
    (l32, u32), (le, ue), (lc, uc) = runs["fp32"], runs["eager"], runs["compiled"]
    print(f"    step-1 loss fp32 {l32:.5f} eager {le:.5f} compiled {lc:.5f}; update differs by "
          f"{(uc - ue).norm() / ue.norm():.4f} (compiled vs eager bf16), {(ue - u32).norm() / ue.norm():.4f} "
          "(eager bf16 vs fp32) of its size")
    assert abs(lc - le) < 0.025 * abs(le), (lc, le)
    assert (uc - ue).norm() < (ue - u32).norm(), ((uc - ue).norm(), (ue - u32).norm())
    ckpt = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["encoder"])
    assert isinstance(common.load_encoder(str(tmp_path / "compiled" / "last.pt"))[0], common.ConvStack)


@runs_at(amp="bf16")
def test_bf16_resume_continues_exactly(tmp_path):
    """Under bf16, 2 epochs in one go == 1 epoch, then --resume (same losses, lr and weights, to the bit: the same
    operations on the same numbers round the same way)."""
    base = ["--data", "shapes", "--shapes-n", "96", "32", "--width", "4", "--batch-size", "32", "--device", "cpu",
            "--knn-every", "1", "--warmup-epochs", "1", "--log-every", "1000"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _quiet(simclr.main, base + ["--epochs", "2", "--out", a])
    _quiet(simclr.main, base + ["--epochs", "1", "--out", b])
    s = _quiet(simclr.main, ["--resume", os.path.join(b, "last.pt"), "--epochs", "2"])
    m1, m2 = ([json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))] for d in (a, b))
    assert s["precision"] == "torch.bfloat16" and [r["epoch"] for r in m2] == [1, 2]
    assert [(r["loss"], r["lr"]) for r in m1] == [(r["loss"], r["lr"]) for r in m2], (m1, m2)
    w1, w2 = (torch.load(os.path.join(d, "last.pt"), weights_only=False)["encoder"] for d in (a, b))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@runs_at(amp="bf16", channels_last="on")
def test_bf16_channels_last_features_match_fp32_nchw():
    """The encoder's features in bf16 and channels_last (forward only: safe on every CPU; training in channels_last
    crashed oneDNN on an AVX2-only CPU, see common.memory_format) are those of fp32 NCHW to bf16 accuracy: cosine
    similarity above 0.99 for every image (a 2.5% error in a feature vector leaves its cosine above 0.9997)."""
    data = common.load_dataset("shapes", shapes_n=(64, 16))
    torch.manual_seed(0)
    enc = common.build_backbone("resnet18", width=4, small_stem=True).eval()
    with precision("off", "off"):
        autocast, _ = common.setup_amp("auto", CPU)
        f32 = common.extract_features(enc, data.train, CPU, autocast=autocast)
    autocast, _ = common.setup_amp("auto", CPU)
    enc = enc.to(memory_format=common.memory_format(CPU))
    f16 = common.extract_features(enc, data.train, CPU, autocast=autocast)
    assert enc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    cos = torch.nn.functional.cosine_similarity(f32.float(), f16.float())
    print(f"    cosine(bf16 NHWC, fp32 NCHW): min {cos.min():.5f}")
    assert cos.min() > 0.99, cos.min()


@runs_at(amp="bf16")
def test_bf16_simclr_learns_its_task_on_shapes(tmp_path):
    """SimCLR under bf16 learns its task on shapes: the NT-Xent loss falls by more than 0.4 and the contrastive
    accuracy ends at least 1.5x its first epoch's. Measured (width 8, 500 images, 6 epochs): loss falls 0.60 / 0.79 /
    0.70 and accuracy rises 2.3x / 8x / 4x with seeds 0 / 1 / 2 on a Zen 4 with native bf16; seed 0 with bf16
    emulated (oneDNN and ATen limited to AVX2): 0.60 and 2.1x. Its kNN margin over a random init is not asserted
    at this budget: it does not hold over seeds (seed 2: 37.4% vs 38.6% at 1,000 images); the fp32 end-to-end test
    in test_simclr.py asserts kNN on a longer run."""
    s = _quiet(simclr.main, ["--data", "shapes", "--shapes-n", "500", "100", "--width", "8", "--batch-size", "64",
                             "--epochs", "6", "--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4",
                             "--crop-min-scale", "0.5", "--device", "cpu", "--knn-every", "6", "--log-every", "1000",
                             "--out", str(tmp_path)])
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    print(f"    loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, contrastive acc {rows[0]['contrastive_acc']:.3f} "
          f"-> {rows[-1]['contrastive_acc']:.3f}")
    assert s["precision"] == "torch.bfloat16"
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.4, rows
    assert rows[-1]["contrastive_acc"] > 1.5 * rows[0]["contrastive_acc"], rows


@runs_at(amp="bf16")
def test_bf16_rotnet_learns_on_shapes(tmp_path):
    """RotNet under bf16 (ResNet-18 width 4, 500 images, 3 epochs): its encoder beats a random-init encoder of the
    same architecture in weighted kNN by more than 8 points. Measured, seeds 0 / 1 / 2: +16.4 / +16.8 / +12.0 on a
    Zen 4 with native bf16, +21.6 / +16.6 / +12.2 with bf16 emulated (oneDNN and ATen limited to AVX2)."""
    s = _quiet(rotnet.main, ["--data", "shapes", "--shapes-n", "500", "500", "--backbone", "resnet18", "--width", "4",
                             "--epochs", "3", "--batch-size", "32", "--lr", "0.1", "--schedule", "cosine",
                             "--knn-every", "3", "--device", "cpu", "--log-every", "1000", "--out", str(tmp_path)])
    base = random_init_knn(common.load_dataset("shapes", shapes_n=(500, 500)), width=4, small_stem=True)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    print(f"    rotation acc {rows[0]['rotation_acc']:.3f} -> {rows[-1]['rotation_acc']:.3f}; kNN {s['knn_top1']:.1f}% "
          f"vs random init {base:.1f}%")
    assert s["precision"] == "torch.bfloat16" and rows[-1]["rotation_acc"] > rows[0]["rotation_acc"]
    assert s["knn_top1"] > base + 8, (s["knn_top1"], base)
