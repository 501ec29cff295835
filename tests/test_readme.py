"""README.md stays true: its tested code block runs, and CI runs exactly its test command."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"<!-- tested: README python -->\n```python\n(.*?)```", README, re.S)
    assert block, "README lost its tested example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert (tmp_path / "demo.mp4").stat().st_size > 0


def test_ci_runs_the_readme_test_command_and_the_demo_command_names_real_files():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2, commands  # one installs and runs the demo, one installs and runs the tests
    demo, tests = commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
    for path in re.findall(r"--(?:image|audio) (\S+)", demo):
        assert (ROOT / path).is_file(), path
    assert "HF_HUB_OFFLINE=1" in tests and os.environ.get("HF_HUB_OFFLINE") == "1"
