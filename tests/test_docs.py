"""Every citation in the repository resolves: `file.py:function` references in the docs name
functions that exist, and no file cites a document outside the repository."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/ALGORITHM.md", "docs/TINY_MODEL.md", "docs/RESULTS.md",
        "docs/PERFORMANCE.md", "docs/household.md"]


def defined_names(path):
    """Top-level functions, classes and constants of a Python file, and Class.method for methods."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_file_function_references_resolve():
    checked = 0
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for path, name in re.findall(r"`([\w/]+\.py):([\w.]+)`", text):
            path = path if os.path.exists(os.path.join(ROOT, path)) else os.path.join("envs", path)
            assert os.path.exists(os.path.join(ROOT, path)), (
                f"{doc} cites {path}, which does not exist")
            assert name in defined_names(os.path.join(ROOT, path)), (
                f"{doc} cites {path}:{name}, not defined there")
            checked += 1
    assert checked >= 30


def test_no_citation_of_documents_outside_the_repository():
    for folder, _, files in os.walk(ROOT):
        if (any(part.startswith(".") for part in os.path.relpath(folder, ROOT).split(os.sep))
                or "runs" in folder):
            continue
        for name in files:
            if name.endswith((".py", ".md")) and name != "test_docs.py":
                text = open(os.path.join(folder, name)).read()
                assert not re.search(r"PAPER\.md|TINY_VLM\.md|shared/", text), (
                    os.path.join(folder, name))


def test_cited_sections_exist():
    headings = re.findall(r"^#+ (\d+(?:\.\d+)?)[. ]",
                          open(os.path.join(ROOT, "docs/ALGORITHM.md")).read(), re.M)
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py") and ".git" not in folder:
                for section in re.findall(r"ALGORITHM\.md §(\d+(?:\.\d+)?)",
                                          open(os.path.join(folder, name)).read()):
                    assert section in headings, (
                        f"{name} cites docs/ALGORITHM.md §{section}, which has no such section")
