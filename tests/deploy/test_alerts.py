"""The alert rules (charts/remem/files/alerts.yaml) pass promtool and their unit tests.

`promtool check rules` validates syntax and templates, `promtool test rules` runs
tests/deploy/alerts_test.yaml. promtool passes a test that expects no alert of a name no
rule has, so this also checks that every alert of the file is tested both firing and
silent, and that each has what an operator's routing needs (for, severity, summary,
description, a documented job label).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts/remem/files/alerts.yaml"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")
SEVERITIES = {"critical", "warning"}
JOBS = {"remem-placement", "remem-pageserver", "remem-mirror", "remem-client"}


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not installed (Debian package prometheus; see `make deps`)")
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_promtool_unit_tests() -> None:
    out = promtool("test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in out, out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert (firing | silent) <= names, (
        f"tests of alerts no rule defines: {(firing | silent) - names}"
    )
    assert names <= firing, f"never tested firing: {sorted(names - firing)}"
    assert names <= silent, f"never tested silent: {sorted(names - silent)}"


def test_every_alert_has_for_severity_and_annotations() -> None:
    header = ALERTS.read_text().split("\ngroups:", 1)[0]
    for rule in alert_rules():
        name = rule["alert"]
        assert name.startswith("Remem"), name
        assert "for" in rule, f"{name} has no for: (it would fire on one bad evaluation)"
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        # the job names the rules select are the ones the header tells deployments to scrape
        for job in re.findall(r'job\s*=~?\s*"([^"]*)"', rule["expr"]):
            assert job in JOBS and f'job="{job}"' in header, f"{name}: undocumented job {job}"
