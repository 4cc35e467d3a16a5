"""utils.report: Markdown tables."""
from utils.report import Table, markdown_table


def test_markdown_table_aligns_columns_text_left_numbers_right():
    text = markdown_table(["model", "top-1"], [["V1", "88.50%"], ["V2-XL", 7]])
    assert text.splitlines() == [
        "| model |  top-1 |",
        "|-------|-------:|",
        "| V1    | 88.50% |",
        "| V2-XL |      7 |",
    ]


def test_table_shows_as_markdown_in_jupyter_and_as_text():
    table = Table(["a", "b"], [["x", "1"]])
    assert table._repr_markdown_() == str(table) == markdown_table(["a", "b"], [["x", "1"]])


def test_a_table_of_words_is_left_aligned():
    assert markdown_table(["a", "bb"], [["x", "y"]], numbers=False).splitlines() == [
        "| a | bb |", "|---|----|", "| x | y  |"]
