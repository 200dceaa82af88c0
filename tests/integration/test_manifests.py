"""The deployment files are checked by the tools their platforms use: deploy/kubernetes.yaml by
kubernetes-validate against Kubernetes' own schemas (strict: an unknown field fails), the
Prometheus rules by `promtool check rules` and `promtool test rules` (Debian's `prometheus`,
installed here when absent as the PostgreSQL and Chromium tests install theirs). The live
metrics endpoint is checked with `promtool check metrics` in test_gateway_access.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
MANIFEST = ROOT / "deploy" / "kubernetes.yaml"
RULES = ROOT / "deploy" / "prometheus"
KUBERNETES_VERSION = "1.37"


def promtool() -> str:
    if found := shutil.which("promtool"):
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus) and this user cannot install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0 or not shutil.which("promtool"):
        pytest.skip(f"apt-get install prometheus failed: {proc.stderr.strip()[-300:]}")
    return shutil.which("promtool")


def validate(path: Path) -> list[str]:
    """kubernetes-validate's verdict on every resource of a file: the problems found."""
    import kubernetes_validate

    problems = []
    for doc in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
    return problems


def test_the_kubernetes_manifests_pass_strict_schema_validation(tmp_path):
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    assert validate(MANIFEST) == []
    # strict means a misspelt field fails: the check can fail
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("minReplicas: 2", "minReplica: 2"))
    assert any("minReplica" in p for p in validate(broken))


def test_the_manifest_wires_keys_metrics_and_autoscaling_to_what_kiln_serve_provides(tmp_path):
    from pipeline.serving.tenants import read_keys_file

    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text())}
    follow = docs[("Deployment", "kiln-smollm2-follow")]["spec"]["template"]["spec"]["containers"][0]
    args = follow["args"]
    assert args[args.index("--keys") + 1].startswith("/etc/kiln-keys/") and "--request-log" in args
    assert follow["readinessProbe"]["httpGet"]["path"] == "/health"  # probes carry no key
    # the Secret's keys file is one `kiln serve --keys` reads
    secret = docs[("Secret", "kiln-api-keys")]["stringData"]["keys.yaml"]
    (tmp_path / "keys.yaml").write_text(secret)
    assert set(read_keys_file(tmp_path / "keys.yaml").tenants) == {"support-bot", "nightly-evals"}
    hpa = docs[("HorizontalPodAutoscaler", "kiln-smollm2-follow")]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "kiln_requests_waiting"
    # the metric exists under that name in the Triton model's code
    assert '"kiln_requests_waiting"' in (ROOT / "pipeline" / "serving" / "triton_model.py").read_text()


def test_the_prometheus_rules_check_and_pass_their_unit_tests():
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", "kiln-rules.yaml"], cwd=RULES, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool, "test", "rules", "kiln-rules.test.yaml"], cwd=RULES, capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
