"""The benchmark pages (issue 21): every page renders through :func:`radssl.study.pages.render_benchmark_page`, from a
result record alone, with its numbers in its tables and every string escaped by the template — no HTML is built in
the scripts. ``--render-only`` rebuilds a page from a committed JSON and never writes the JSON.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from support import bakeoff_run, load_benchmark_script

from radssl.study.pages import Cell, PageSection, Paragraph, Table, interval_cell, render_benchmark_page

EVIL = "<script>alert(1)</script>"
MACHINE = {"description": f"2-core CPU {EVIL}", "load_average_at_start": [0.5, 0.5, 0.5],
           "versions": {"torch": "2.x", "radssl": "0.1.0"}}


class _Tables(HTMLParser):
    """Each ``<table>`` of a page as rows of cell texts (header row first), and every ``<script>`` start tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:  # noqa: ANN001
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def assert_escaped(page: str) -> None:
    """The malicious string is on the page only as text: no script element, its escaped form present."""
    assert parse(page).scripts == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ------------------------------------------------------------------------------------------ the template itself
def test_benchmark_page_escapes_every_text_slot_and_lays_out_tables_from_rows() -> None:
    table = Table(["name", "AUC"], [[EVIL, interval_cell(0.8125, 0.75, 0.875)], ["b", Cell("0.5", ("n 3",), True)]],
                  numeric=[1], caption=EVIL)
    section = PageSection("s", EVIL, paragraphs=[EVIL, Paragraph(EVIL, EVIL)], tables=[table], fine_print=[EVIL],
                          bullets=[EVIL], preformatted=[json.dumps({"k": EVIL})])
    page = render_benchmark_page(title=EVIL, heading=EVIL, subtitle=EVIL, sections=[section], machine=MACHINE,
                                 notes=[EVIL], footer=[EVIL])
    assert_escaped(page)
    # title, heading, subtitle, nav, h2, note, paragraph, lead + paragraph, caption, cell, fine print, bullet, JSON,
    # footer line, machine: 16 plain-text slots, each escaped
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 16
    tables = parse(page).tables
    assert tables == [[["name", "AUC"], [EVIL, "0.812 [0.750, 0.875]"], ["b", "0.5 n 3"]]]
    assert '<td class="num"><b>0.5</b> <small>n 3</small></td>' in page
    assert "Machine: 2-core CPU" in page and "Versions: torch 2.x, radssl 0.1.0" in page


def test_an_interval_cell_without_bounds_shows_the_value_alone() -> None:
    assert interval_cell(0.5, float("nan"), float("nan")) == Cell("0.500")
    assert interval_cell(-0.25, None, 0.1, difference=True, after=("p 0.2",)) == Cell("−0.250", ("[–, 0.100]", "p 0.2"))


def test_a_table_row_of_the_wrong_length_is_refused_naming_the_table() -> None:
    with pytest.raises(ValueError, match=r"'AUC table': row 1 has 1 cells for 2 headers"):
        Table(["a", "b"], [["1", "2"], ["3"]], caption="AUC table")


# ------------------------------------------------------------------------------------------ method_bakeoff
@pytest.fixture(scope="module")
def bakeoff():  # noqa: ANN201 - a module
    return load_benchmark_script("method_bakeoff")


_run = bakeoff_run


def _bakeoff_record(bakeoff) -> dict:  # noqa: ANN001
    runs = [_run("simclr", s, [0.70 + 0.01 * s, 0.80, 0.90], [0.60, 0.70, 0.80]) for s in range(3)]
    runs += [_run(EVIL, s, [0.65, 0.75, 0.85 + 0.01 * s], [0.60, 0.70, 0.80]) for s in range(3)]
    lightly = {"documented": [{"seed": s, "images_seen": 1000, "threads": 2, "budget": {"rule": "images_seen"},
                               "ssl": {"linear": {f: {"test_auc": 0.6} for f in ("0.01", "0.1", "1")}}}
                              for s in range(3)]}
    return {"settings": {"dataset": "breastmnist", "note": EVIL}, "budget_statement": f"1000 images {EVIL}",
            "machine": {"cpu": "AMD EPYC", "cpu_count": 2, "torch_threads": 2, "gpu": None,
                        "load_average_at_start": [1.0, 1.0, 1.0]},
            "versions": {"torch": "2.x"}, "summary": bakeoff.summarise(runs, lightly), "runs": runs}


def test_method_bakeoff_page_has_one_row_per_method_with_its_intervals(bakeoff) -> None:  # noqa: ANN001
    page = bakeoff.render_html(_bakeoff_record(bakeoff))
    assert_escaped(page)
    (header, *rows), = parse(page).tables
    assert len(rows) == 2 and [r[0] for r in rows] == [EVIL, "simclr"]
    assert len(header) == 6 + 3 + 1 + 3 + 3 and all(len(r) == len(header) for r in rows)
    simclr = dict(zip(header, rows[1]))
    # mean of .70/.71/.72 = .710 with its t-interval over 3 seeds; the gain over random paired by seed
    assert simclr["linear probe 1 %"] == "0.710 [0.685, 0.735]"
    assert simclr["gain vs random, linear probe 1 %"] == "+0.110 [0.085, 0.135]"
    assert simclr["− lightly documented, paired, linear 1 %"] == "+0.110 [0.085, 0.135]"
    assert simclr["kNN 100 %"] == "0.900 [0.900, 0.900]"
    assert "Machine: 2-core CPU (AMD EPYC), no GPU; torch threads 2" in page
    assert page.count("<img ") == 1


def test_method_bakeoff_reads_the_committed_summaries_older_lightly_keys(bakeoff) -> None:  # noqa: ANN001
    """The committed JSON predates per-arm lightly bars: its single rerun is the arm "rerun"."""
    record = json.loads(bakeoff.RESULTS.joinpath("method_bakeoff_breastmnist.json").read_text())
    (header, *rows), = parse(bakeoff.render_html(record)).tables
    assert "− lightly rerun, paired, linear 1 %" in header
    assert len(rows) == len(record["summary"]["methods"])
    moco = dict(zip(header, next(r for r in rows if r[0] == "moco_v2")))
    paired = record["summary"]["methods"]["moco_v2"]["minus_lightly_example_paired"]["0.01"]
    assert moco["− lightly rerun, paired, linear 1 %"].startswith(f"{paired['mean']:+.3f}")




def test_render_only_never_writes_the_json(bakeoff, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(bakeoff, "RESULTS", tmp_path)
    (tmp_path / "method_bakeoff_breastmnist_x.json").write_text(json.dumps(_bakeoff_record(bakeoff)))
    before = (tmp_path / "method_bakeoff_breastmnist_x.json").read_bytes()
    assert bakeoff.main(["--dataset", "breastmnist", "--tag", "x", "--render-only"]) == 0
    assert (tmp_path / "method_bakeoff_breastmnist_x.json").read_bytes() == before
    assert "0.710 <small>[0.685, 0.735]</small>" in (tmp_path / "method_bakeoff_breastmnist_x.html").read_text()
    with pytest.raises(SystemExit, match="method_bakeoff_pneumoniamnist.json: no result file"):
        bakeoff.main(["--dataset", "pneumoniamnist", "--render-only"])


# ------------------------------------------------------------------------------------------ the other three
def test_label_efficiency_3d_page_from_a_small_record() -> None:
    module = load_benchmark_script("label_efficiency_3d")
    arm = {f: {"mean": m, "seed_t_interval": [m - 0.05, m + 0.05], "train_cases": n}
           for f, m, n in (("0.01", 0.61, 14), ("1.0", 0.83, 1335))}
    dice = {"dice_mean": {"mean": 0.7, "case_bootstrap_ci": [0.68, 0.72]}, "dice_anterior": {"mean": 0.71},
            "dice_posterior": {"mean": 0.69}, "hd95_mean": {"mean": 7.25}}
    payload = {
        "question": EVIL, "machine": MACHINE, "settings": {"seeds": [0, 1]}, "notes": [EVIL, "second note"],
        "budget": {"statement": "12 CPU-minutes"},
        "vessel": {"data": {"description": EVIL, "splits": {"train": 1335}, "positives": {"train": 150}},
                   "pretraining": {"method": "simclr", "backbone": "small_cnn_3d", "steps": 3, "batch_size": 2,
                                   "images_seen": 6, "final_loss": 1.5},
                   "protocol": "linear probe",
                   "summary": {"arms": {"random": arm, "ssl": arm},
                               "ssl_minus_random": {f: {"mean": 0.042, "seeds_and_cases_interval": [0.01, 0.07],
                                                        "p": 0.031} for f in arm}}},
        "hippocampus": {"data": {"description": "MSD", "splits": {}, "caveat": EVIL},
                        "pretraining": {"method": "genesis", "backbone": "cnn", "steps": 3, "batch_size": 2,
                                        "pretrain_images": 10, "final_loss": 1.0},
                        "protocol": "fine-tune", "subsets": {"1.0": 182},
                        "summary": {"arms": {"finetune/random": {"1.0": dice}, "finetune/ssl": {"1.0": dice}},
                                    "ssl_minus_random": {"finetune": {"1.0": {
                                        "dice_difference": 0.012, "paired_bootstrap_ci": [0.003, 0.021],
                                        "paired_bootstrap_p": 0.015, "wilcoxon_p": 0.004}}}}},
        "resources": [{"kind": EVIL, "samples_per_s": 12.345, "unit": "volumes", "peak_rss_mb": 790.1}],
    }
    page = module.render_html(payload)
    assert_escaped(page)
    vessel, hippo, resources = parse(page).tables
    assert vessel == [["encoder", "1% (14 volumes)", "100% (1335 volumes)"],
                      ["random", "0.610 [0.560, 0.660]", "0.830 [0.780, 0.880]"],
                      ["ssl", "0.610 [0.560, 0.660]", "0.830 [0.780, 0.880]"],
                      ["SSL − random", "+0.042 [0.010, 0.070] p 0.031", "+0.042 [0.010, 0.070] p 0.031"]]
    assert hippo[1] == ["finetune/random", "0.700 [0.680, 0.720] ant 0.710 · post 0.690 · HD95 7.2 mm"]
    assert hippo[3] == ["SSL − random (finetune)", "+0.012 [0.003, 0.021] bootstrap p 0.015, Wilcoxon p 0.004"]
    assert resources == [["workload", "samples/s (wall)", "unit", "peak RSS MB"], [EVIL, "12.35", "volumes", "790.1"]]
    assert page.count("<img ") == 2 and "Budget: 12 CPU-minutes" in page
    assert "<li>second note</li>" in page  # the reading: one bullet per note


def test_multimodal_page_from_a_small_record() -> None:
    module = load_benchmark_script("multimodal")
    recall = {k: {"mean": 0.25, "sd": 0.05, "n": 2} for k in ("R@1", "R@5", "R@10")}
    chance = {k: {"mean": 0.01, "sd": 0.0, "n": 2} for k in ("R@1", "R@5", "R@10")}
    results = {"budget": EVIL, "settings": {"steps": 6}, "machine": MACHINE, "versions": {"torch": "2.x"},
               "wall_time_s": 61.0,
               "summary": {"synthetic": {
                   EVIL: {"image_to_text": recall, "text_to_image": recall, "chance_image_to_text": chance,
                          "chance_text_to_image": chance, "zero_shot_auc": {"mean": 0.9, "sd": 0.0, "n": 1},
                          "seconds_per_step": {"mean": 0.5, "sd": 0.1, "n": 2},
                          "probe_auc": {"0.01": {"mean": 0.7, "sd": 0.02, "n": 2}}},
                   "random_init": {"probe_auc": {"1": {"mean": 0.6, "sd": 0.0, "n": 1}}}}}}
    page = module.html_page(results)
    assert_escaped(page)
    retrieval, probe = parse(page).tables
    assert retrieval[1] == ["synthetic", EVIL] + ["0.250 ± 0.050 chance 0.010 ± 0.000"] * 6 + ["0.900", "–",
                                                                                              "0.50 ± 0.10"]
    assert probe == [["image encoder", "1% labels", "10% labels", "100% labels"],
                     [EVIL, "0.700 ± 0.020", "–", "–"], ["random_init", "–", "–", "0.600"]]
    assert "Total wall time: 61 s" in page


def test_pairing_bakeoff_page_from_a_small_record() -> None:
    module = load_benchmark_script("pairing_bakeoff")
    fractions = [0.01, 1.0]

    def entry(mean: float, both: bool) -> dict:
        out = {"mean": mean, "seed_t_interval": [mean - 0.1, mean + 0.1]}
        return {**out, "seeds_and_cases_interval": [mean - 0.05, mean + 0.05], "seeds_and_cases_p": 0.25} \
            if both else out

    arms = {arm: {level: {str(f): entry(0.7, level == "volume") for f in fractions} for level in module.LEVELS}
            for arm in (*module.ARMS, module.FLOOR)}
    contrast = {level: {str(f): entry(-0.02, level == "volume") for f in fractions} for level in module.LEVELS}
    run = {"images_seen": 512, "cross_image_share": 0.4, "final_loss": 2.5, "cpu_s": 10.0, "wall_s": 12.0}
    payload = {"question": EVIL, "data": {"description": EVIL}, "budget": {"statement": "512 images"},
               "settings": {"label_fractions": fractions, "seeds": [0, 1]}, "machine": MACHINE, "notes": [EVIL],
               "pretraining": {arm: {"0": run} for arm in module.ARMS},
               "summary": {"arms": arms, "slice_pairs_minus_two_view": contrast}}
    page = module.render_html(payload)
    assert_escaped(page)
    probe, paired, runs = parse(page).tables
    assert len(probe) == 1 + len(module.LEVELS) * 3
    assert probe[1] == ["volume", "two_view"] + ["0.700 [0.600, 0.800] seeds+cases [0.650, 0.750]"] * 2
    assert probe[-1] == ["slice", "random_init"] + ["0.700 [0.600, 0.800]"] * 2
    assert paired[1] == ["volume"] + ["−0.020 [-0.120, 0.080] seeds+cases [-0.070, 0.030], p 0.25"] * 2
    assert paired[2] == ["slice"] + ["−0.020 [-0.120, 0.080]"] * 2
    assert runs[1:] == [["two_view", "0", "512", "0.400", "2.500", "10.0", "12.0"],
                        ["slice_pairs", "0", "512", "0.400", "2.500", "10.0", "12.0"]]


def test_render_from_result_reads_the_json_and_writes_it_back_only_when_renoting(tmp_path) -> None:  # noqa: ANN001
    common = load_benchmark_script("common")
    path = tmp_path / "result.json"
    path.write_text('{"notes": ["old"]}')
    page = common.render_from_result(path, lambda record: f"<p>{record['notes'][0]}</p>")
    assert page.read_text() == "<p>old</p>" and path.read_text() == '{"notes": ["old"]}'
    common.render_from_result(path, lambda record: f"<p>{record['notes'][0]}</p>",
                              renote=lambda record: record.update(notes=["new"]))
    assert page.read_text() == "<p>new</p>" and json.loads(path.read_text()) == {"notes": ["new"]}
    with pytest.raises(SystemExit, match="missing.json: no result file"):
        common.render_from_result(tmp_path / "missing.json", str)
