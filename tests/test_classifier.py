import json

import torch

from llm_cxr.classifier import ClassifierConfig, FindingClassifier, targets_from_findings
from llm_cxr.cli import main
from llm_cxr.data.schema import FINDING_NAMES, Finding, findings_to_json
from llm_cxr.vqgan.losses import FeatureLoss, load_feature_net


def test_targets_and_save_load_roundtrip(tmp_path):
    y = targets_from_findings([findings_to_json([Finding("edema", "bilateral")]), "[]"], FINDING_NAMES)
    assert y.shape == (2, len(FINDING_NAMES)) and y[0, FINDING_NAMES.index("edema")] == 1 and y[1].sum() == 0
    torch.manual_seed(0)
    m = FindingClassifier(ClassifierConfig(resolution=32, channels=(8, 16))).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    m.save_pretrained(tmp_path / "clf")
    again = FindingClassifier.from_pretrained(tmp_path / "clf")
    assert torch.equal(again(x), m(x))
    # exported feature net: a frozen feature loss that is zero on identical images only
    net = load_feature_net(m.export_feature_net(tmp_path / "f.pt2"))
    loss = FeatureLoss(net)
    assert loss(x, x).item() < 1e-6 and loss(x, -x).item() > 1e-3


def test_classifier_cli_produces_a_loadable_model(tmp_path):
    """A smoke test of the CLI path; how well it learns is measured in benchmarks/bench_vqgan.py."""
    data = tmp_path / "ds"
    assert main(["-q", "data", "synth", "--n", "160", "--size", "64", "--seed", "1", "--out", str(data)]) == 0
    out = tmp_path / "clf"
    assert main(["-q", "classifier", "train", "--data", str(data), "--out", str(out), "--resolution", "64",
                 "--epochs", "3", "--export-feature-net"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"n", "label_accuracy", "exact_match", "micro_f1"} and metrics["n"] > 0
    clf = FindingClassifier.from_pretrained(out)
    assert clf.predict(torch.zeros(2, 1, 64, 64)).shape == (2, len(FINDING_NAMES))
    assert (out / "feature_net.pt2").exists()
