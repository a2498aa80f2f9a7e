"""tools.figure_citations: the convention for measured numbers in the docs, on doctored strings
that must fail (a wrong cited value, an unmarked measurement, a hand marker without where or
when) and ones that must pass (input sizes, code, sections measured by hand)."""
import json

from tools import figures
from tools.figure_citations import cite_values, doc_problems, update_docs


def fake_figures(**values: float) -> dict:
    """A figures file holding `values`, given as `NAME__KEY=value`."""
    records: dict = {}
    for name, value in values.items():
        measurement, key = name.split("__")
        records.setdefault(measurement, {"date": "2026-12-07T09:00:00Z", "load_before": [0.5],
                                         "values": {}})["values"][key] = value
    return {"cpu_kind": "fake", "figures": records}


FAKE = [fake_figures(demo__model_nsdr=2.0512, demo__seconds=131.4,
                     separation_vs_official__time_ratio=0.7264)]


def test_a_cited_number_must_be_the_value_to_its_rounding():
    assert doc_problems("scores 2.05 dB [fig:demo.model_nsdr] here", FAKE) == []
    assert doc_problems("took 131 s [fig:demo.seconds]", FAKE) == []
    assert doc_problems("ratio 0.726 [fig:separation_vs_official.time_ratio]", FAKE) == []
    doctored = doc_problems("scores 2.15 dB [fig:demo.model_nsdr] here", FAKE)
    assert len(doctored) == 1 and "2.15 [fig:demo.model_nsdr] is in no figures file" in doctored[0]
    assert doc_problems("ratio 0.73 [fig:separation_vs_official.time_ratio]", FAKE) == []
    assert doc_problems("ratio 0.725 [fig:separation_vs_official.time_ratio]", FAKE)
    assert "no figure 'demo.nsdr'" in doc_problems("2.05 dB [fig:demo.nsdr]", FAKE)[0]
    assert "no number before" in doc_problems("fast [fig:demo.seconds]", FAKE)[0]
    assert "none" in doc_problems("2.05 [fig:onnx.fp32_ratio]", FAKE)[0]


def test_unmarked_measurements_need_a_marker_or_a_hand_section():
    assert "2.15 dB, 12.5 s" in doc_problems("It scored 2.15 dB in 12.5 s.", FAKE)[0]
    for claim in ["peak 1253 MiB", "-32 %", "2.4x slower", "ratio 0.642", "100-130 s"]:
        assert doc_problems(claim, FAKE), claim
    for spec in ["a 7.8 s segment", "30 s stereo", "its segment (7.8 s for htdemucs)",
                 "`--seconds 2.5 s`", "```\n1.5 dB\n```", "<!-- 2.5 dB -->", "1e-4 relative"]:
        assert doc_problems(spec, FAKE) == [], spec
    assert doc_problems("12.5 s [hand: SPR, 2026-11-25]", FAKE) == []
    section = "## Old\n\n[hand: EPYC Zen 5, 2026-12-02]\n\n12.5 s\n\n### Sub\n\n1.5 dB\n"
    assert doc_problems(section, FAKE) == []
    after = doc_problems(section + "\n## New\n\n2.5 dB\n", FAKE)
    assert len(after) == 1 and after[0].startswith("line 13:")


def test_hand_markers_say_where_and_when():
    assert "must say where and when" in doc_problems("1.5 s [hand: SPR]", FAKE)[0]
    assert "must say where and when" in doc_problems("1.5 s [hand: 2026-11-25]", FAKE)[0]


def test_a_table_is_covered_by_a_marker_in_it_or_in_the_paragraph_before():
    table = "| a | b |\n|---|---|\n| 1.5 s | 2.5 s |\n"
    assert len(doc_problems(table, FAKE)) == 1
    assert doc_problems("Timed by hand [hand: SPR, 2026-11-25]:\n\n" + table, FAKE) == []
    assert doc_problems(table + "| 3.5 s [hand: SPR, 2026-11-25] | |\n", FAKE) == []
    assert len(doc_problems("Intro.\n\n" + table, FAKE)) == 1


def test_cite_values_rewrites_the_cited_numbers_at_their_precision(tmp_path, monkeypatch):
    text = ("took 100 s [fig:demo.seconds], scored 1.88 dB [fig:demo.model_nsdr]; "
            "0.5 [fig:onnx.fp32_ratio] is not measured there; 7 songs; `1.0 [fig:demo.seconds]`")
    cited = cite_values(text, FAKE[0])
    assert cited == ("took 131 s [fig:demo.seconds], scored 2.05 dB [fig:demo.model_nsdr]; "
                     "0.5 [fig:onnx.fp32_ratio] is not measured there; 7 songs; "
                     "`1.0 [fig:demo.seconds]`")
    assert doc_problems(cited.replace("0.5 [fig:onnx.fp32_ratio]", ""), FAKE) == []
    monkeypatch.setattr(figures, "FIGURES_DIR", tmp_path)
    (tmp_path / "fake.json").write_text(json.dumps(FAKE[0]))
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    assert update_docs("fake", [doc, tmp_path / "fake.json"]) == [doc]
    assert doc.read_text() == cited


def test_the_generated_table_is_not_checked_as_prose():
    table = f"{figures.TABLE_BEGIN}\n| demo | 1.5 s | 2.05 dB |\n{figures.TABLE_END}\n"
    assert doc_problems(table + "\n2.5 dB\n", FAKE) == [
        "line 5: 2.5 dB look measured but cite no figure: add [fig:NAME.KEY] or "
        "[hand: WHERE, YYYY-MM-DD]"]
