"""Errors in the settings, in the user's terms and on one line: jsonargparse's (the setting, the value given and
what it takes, the unknown class or argument and the closest existing ones, the package a class needs, instead of
a dump of every type a union could have held; the closest valid keys to a misspelt one) and Lightning's refusals
of a trainer setting."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys

from pytorch_lightning.cli import LightningArgumentParser

UNKNOWN_CLASS = re.compile(
    r"Problem with given class_path '(?P<path>[\w.]+)':\s*\n\s*"
    r"(?:module '(?P<module>[\w.]+)' has no attribute '(?P<name>\w+)'|No module named '(?P<missing>[\w.]+)')"
)
LEAF = re.compile(r"Expected a (?P<type>.+?)\. Got value: (?P<value>.+)")
SUBTYPES = re.compile(r"Subtypes: \[(?P<types>.*)\]")
GIVEN = re.compile(r"Given value type: <class 'str'>\s*\n\s*Given value: (?P<value>.*?)(?:\. Got value: .*)?$", re.M)
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
UNKNOWN_OPTION = re.compile(
    r"Problem with given class_path '(?P<path>[\w.]+)':\s*\n\s*Option '(?P<option>[\w.]+)' is not accepted"
)
CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':")
MISSING_REQUIREMENT = re.compile(r"Requirement '(?P<requirement>[^']+)' not met")
OWN_MESSAGE = re.compile(r"^\s*- (?!Expected a|Problem with given|Does not validate|Type typing)(?P<text>\S.*)$", re.M)
PACKAGES = ("lightning_modules", "lightning_modules.nets", "lightning_modules.layers", "datamodules", "callbacks")


def plain(message: str) -> str | None:
    """The error in one line, or None when it is none of the kinds this knows (the caller keeps the original)."""
    keys = PARSER_KEY.findall(message)
    setting = "--" + ".init_args.".join(keys) + ": " if keys else ""
    unknown = UNKNOWN_CLASS.search(message)
    if unknown:
        return setting + unknown_class(unknown)
    option = UNKNOWN_OPTION.search(message)
    if option:
        keys = PARSER_KEY.findall(message, 0, option.start())  # the keys down to the class that refused it
        where = "--" + ".init_args.".join(keys) + ": " if keys else ""
        return where + unknown_option(option["path"], option["option"])
    missing = list(MISSING_REQUIREMENT.finditer(message))
    if missing:
        path = [m["path"] for m in CLASS_PATH.finditer(message, 0, missing[0].start())][-1:]
        return setting + missing_packages(path[0] if path else "this setting", [m["requirement"] for m in missing])
    leaf = LEAF.search(message)
    if leaf:
        return f"{setting}{leaf['value'].strip()!r} is not {expected([leaf['type']])}"
    given = list(GIVEN.finditer(message))
    if given:  # the innermost union the user's text reached, and the types it offered
        subtypes = list(SUBTYPES.finditer(message, 0, given[-1].start()))
        if subtypes:
            return f"{setting}{given[-1]['value'].strip()!r} is not {expected(split_types(subtypes[-1]['types']))}"
    own = OWN_MESSAGE.search(message)
    if own:  # a class refused the value in its constructor and said why
        return setting + own["text"].strip()
    return None


def expected(types: list[str]) -> str:
    """What a setting takes: `an int or null`, `one of 64, 32, '16-mixed' or null`."""
    literals = [m[1] for t in types if (m := re.fullmatch(r"typing\.Literal\[(.*)\]", t.strip()))]
    others = [type_name(t) for t in types if not re.fullmatch(r"typing\.Literal\[(.*)\]", t.strip())]
    options = ([f"one of {', '.join(literals)}"] if literals else []) + others
    return " or ".join(options)


def unknown_class(match: re.Match) -> str:
    """`no class lightning_modules.Clasifier; did you mean lightning_modules.Classifier?`"""
    if match["missing"]:
        close = difflib.get_close_matches(match["missing"], PACKAGES, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"no module {match['missing']} (class_path {match['path']}){hint}"
    module, name = match["module"], match["name"]
    try:
        found = importlib.import_module(module)
        names = [n for n in getattr(found, "__all__", dir(found)) if not n.startswith("_")]
        classes = [n for n in names if inspect.isclass(getattr(found, n, None))]
    except Exception:  # noqa: BLE001 (a module that cannot be imported has no names to offer)
        classes = []
    close = difflib.get_close_matches(name, classes, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'{module}.{c}' for c in close)}?" if close else ""
    return f"no class {module}.{name}{hint}"


def unknown_option(path: str, option: str) -> str:
    """`lightning_modules.nets.DepthCNN takes no dept; did you mean depth?`, or the class's own word on why it has
    no such setting (`unused_settings`: the in-memory datamodules' `num_workers`)."""
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
        taken = [n for n, p in inspect.signature(found).parameters.items() if p.kind is not p.VAR_KEYWORD]
    except Exception:  # noqa: BLE001 (a class that cannot be imported has no arguments to offer)
        found, taken = None, []
    why = getattr(found, "unused_settings", {}).get(option)
    if why:
        return f"{path} takes no {option}: {why}"
    close = difflib.get_close_matches(option, taken, n=2, cutoff=0.6)
    return f"{path} takes no {option}" + (f"; did you mean {' or '.join(close)}?" if close else "")


def missing_packages(path: str, requirements: list[str]) -> str:
    """`pytorch_lightning.loggers.TensorBoardLogger needs tensorboard or tensorboardX, neither installed here: pip
    install tensorboard`, from the requirements a class checked (lightning_utilities' RequirementCache)."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for requirement in requirements:
        try:
            names.append(Requirement(requirement).name)
        except InvalidRequirement:
            names.append(requirement)
    names = sorted(dict.fromkeys(names), key=lambda n: (len(n), n))  # the plain name first: tensorboard
    installed = {1: "not installed here", 2: "neither installed here"}.get(len(names), "none installed here")
    return f"{path} needs {' or '.join(names)}, {installed}: pip install {names[0]}"


def split_types(text: str) -> list[str]:
    """The members of a `Subtypes: [...]` list (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def type_name(text: str) -> str:
    """`<class 'int'>` -> `an int`, `<class 'NoneType'>` -> `null`, `<class 'torch.Tensor'>` -> `a Tensor`."""
    text = text.strip()
    name = re.fullmatch(r"<class '([\w.]+)'>", text)
    short = (name[1] if name else text).rsplit(".", 1)[-1]
    return {"NoneType": "null", "int": "an int", "float": "a float", "bool": "a bool", "str": "a string"}.get(
        short, f"a {short}"
    )


def did_you_mean(message: str, keys: list[str]) -> str:
    """`; did you mean --trainer.max_epochs?` for the first unknown key a parser error names (empty if none close)."""
    names = re.findall(r"--([\w.]+)|(?:[Kk]ey|option) ['\"]([\w.]+)['\"]", message)
    for name in (a or b for a, b in names):
        close = difflib.get_close_matches(name, keys, n=2, cutoff=0.75)
        if close and name not in keys:
            return "; did you mean " + " or ".join(f"--{c}" for c in close) + "?"
    return ""


class ShortErrorParser(LightningArgumentParser):
    """Parse errors as the error first and short, with the closest valid keys; the usage is left to --help."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        subparsers = (
            getattr(getattr(parser, "_subcommands_action", None), "choices", None) or {}
        )  # see library_internals
        keys = [a.dest for p in (parser, *subparsers.values()) for a in p._actions if a.dest not in (None, "help")]
        lines = [line for line in message.strip().splitlines() if line.strip()]
        short = plain(message) or " ".join(line.strip() for line in lines[:6]) + (" ..." if len(lines) > 6 else "")
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short}{did_you_mean(message, keys)}\n({prog} --help lists every option)\n")
        self.exit(2)


def trainer_problem(error: Exception, accelerator: object) -> str:
    """Lightning's refusal of a trainer setting in the user's terms: a GPU asked for where none is visible, or its
    own message on one line."""
    if str(accelerator) in ("gpu", "cuda") and "backend" in str(error).lower():
        return (
            f"--trainer.accelerator {accelerator}: no GPU is visible here (torch.cuda.is_available() is False); "
            f"train on the CPU with --trainer.accelerator cpu"
        )
    return "trainer: " + " ".join(str(error).split())
