"""`dvc plots show` that renders with no internet.

DVC's HTML page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline its charts are empty
divs. `render_offline` gives `dvc plots show` an HTML template (`--html-template`) with the three
libraries inlined instead: vl-convert ships them as one bundle (`vl_convert.javascript_bundle`), so
the page needs nothing from the network. DVC fills the template's `{plot_divs}`; its `{scripts}`
placeholder (the CDN tags) is left out on purpose.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from drywall_qa.contracts.atomic import write_text_atomic
from drywall_qa.errors import DrywallQAError

# DVC's templates are Vega-Lite v5 specs; the bundle must be a v5 Vega-Lite to compile them.
VEGA_LITE_VERSION = "5.21"
TEMPLATE_PATH = Path(".dvc/tmp/plots_offline.html")


class PlotsError(DrywallQAError, RuntimeError):
    """`dvc plots show` failed; the message carries DVC's own output."""


def offline_template(vl_version: str = VEGA_LITE_VERSION) -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    # a literal "</script>" inside the bundle would end the inline script early
    bundle = bundle.replace("</script", "<\\/script")
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>drywall-qa plots</title>\n'
        f'<script type="text/javascript">\n{bundle}\n</script>\n'
        "<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def render_offline(repo_root: str | Path = ".", out_dir: str = "dvc_plots", dvc_args: Sequence[str] = ()) -> Path:
    """Run `dvc plots show` in `repo_root` with the offline template; returns the page's path."""
    root = Path(repo_root)
    template = root / TEMPLATE_PATH
    write_text_atomic(template, offline_template())
    command = ["dvc", "plots", "show", "--html-template", str(TEMPLATE_PATH), "--out", out_dir, *dvc_args]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PlotsError(
            f"{' '.join(command)} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}"
        )
    return root / out_dir / "index.html"
