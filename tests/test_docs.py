"""Every citation in the repository resolves: `file.py:function` references in the docs name
functions that exist, and no file cites a document outside the repository."""
import ast
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/ALGORITHM.md", "docs/TINY_MODEL.md", "docs/RESULTS.md",
        "docs/PERFORMANCE.md"]


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


def usage_blocks(module):
    """The code of a module docstring's "Usage" blocks: the indented lines after a line that
    starts with "Usage" and ends with ':'."""
    blocks, block = [], None
    for line in module.__doc__.splitlines():
        if re.match(r"^Usage\b.*:$", line):
            block = []
            blocks.append(block)
        elif block is not None and (not line.strip() or line.startswith("    ")):
            block.append(line[4:])
        else:
            block = None
    return ["\n".join(b) for b in blocks]


def test_usage_examples_of_the_maths_files_run():
    """Every usage example in the docstrings of the files a reader copies (ppo, merge, distill,
    critic) runs as written, given toy tensors for the names it leaves to the reader."""
    import critic
    import distill
    import merge
    import ppo
    torch.manual_seed(0)
    t, n, b, length, vocab = 4, 8, 8, 5, 11
    w = torch.nn.Parameter(torch.zeros(vocab))
    base = torch.randn(b, length, vocab)
    given = {
        ppo: dict(rewards=torch.randn(t, n), values=torch.randn(t, n),
                  next_values=torch.randn(t, n), terminated=torch.zeros(t, n),
                  truncated=torch.zeros(t, n), format_bonus=torch.full((t, n), 3.0), beta=1.0,
                  kl=torch.rand(t, n), logits=base + w, tokens=torch.randint(vocab, (b, length)),
                  th_mask=torch.tensor([[1, 1, 1, 0, 0]] * b).bool(),
                  act_mask=torch.tensor([[0, 0, 0, 1, 1]] * b).bool(), old_lp=torch.randn(b),
                  idx=list(range(b)), v=w[:b] * 2, lora=[w],
                  loss_of=lambda indices: (w[: len(indices)] ** 2).sum(),
                  optimizer=torch.optim.SGD([w], lr=0.1), actor_params=[w], critic_params=[]),
        merge: dict(lora_snapshots=[{"a.lora_A.weight": torch.randn(2, 3)} for _ in range(3)]),
        distill: dict(policy_lp=-torch.rand(b, length), teacher_lp=-torch.rand(b, length),
                      thought_mask=torch.ones(b, length), advantages=torch.randn(b),
                      ppo_loss=torch.tensor(0.5), c_sft=1.0,
                      policy_lp_of_teacher_answer=-torch.rand(b, length),
                      teacher_thought_mask=torch.ones(b, length)),
        critic: dict(hidden=16, mean=1.0, var=4.0, count=32, states=torch.randn(b, 16),
                     returns=torch.randn(b)),
    }
    for module, names in given.items():
        blocks = usage_blocks(module)
        assert blocks, f"{module.__name__}.py has no Usage block"
        namespace = dict(vars(module)) | names | {"torch": torch}
        for code in blocks:
            exec(code, namespace)
