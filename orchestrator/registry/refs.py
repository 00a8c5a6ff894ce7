"""References to registry versions, in every form a user may type one.

    models:/digits@production   an alias of a model (MLflow's form)
    models:/digits/3            a version number of a model ('latest': its newest version)
    digits:3                    the same, short
    digits@production           an alias, short
    3, production, latest       a version or alias of a model named elsewhere (`--model`, `registry.model_name`)

Model and alias names are letters, digits, '-', '_' and '.', so ':', '@' and '/' never occur inside a
name and every form parses one way. `ModelRegistry.get/resolve/load` accept each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Optional, Tuple, Union

from orchestrator.config import is_identifier

SCHEME = "models:/"
LATEST = "latest"
FORMS = "models:/<model>@<alias>, models:/<model>/<version>, <model>:<version>, <model>@<alias>, <version> or <alias>"
"""The accepted forms, as error messages list them."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: which model (when it names one) and which of its versions."""

    model: Optional[str]
    """The model's name; None for a bare version or alias (the model is named elsewhere)."""
    selector: str
    """A version number (as text), an alias, or 'latest': what `ModelRegistry.resolve` takes."""

    @property
    def version(self) -> Optional[int]:
        """The version number, when the reference names one (not an alias or 'latest')."""
        return int(self.selector) if _is_number(self.selector) else None

    def __str__(self) -> str:
        if self.model is None:
            return self.selector
        by_number = _is_number(self.selector) or self.selector == LATEST
        return f"{SCHEME}{self.model}{'/' if by_number else '@'}{self.selector}"


def parse_ref(ref: Union[int, str]) -> ModelRef:
    """The `ModelRef` of `ref` in any of the forms above. Raises ValueError naming `ref` and the forms."""
    text = str(ref)
    if text.startswith(SCHEME):
        model, sep, selector = _split_once(text[len(SCHEME):], "@", "/")
        if not sep:
            _fail(text, f"{SCHEME}<model> needs '/<version>' or '@<alias>' after the name")
    else:
        model, sep, selector = _split_once(text, "@", ":")
        if not sep:
            model, selector = None, text
    if model is not None and not is_identifier(model):
        _fail(text, f"invalid model name {model!r}")
    _check_selector(text, selector, sep)
    return ModelRef(model, selector)


def split_ref(model: str, ref: Union[int, str, None]) -> Tuple[str, str]:
    """(model, selector) of a version named either as `(model, ref)` (ref in any form; a ref that names a
    model must name `model`) or, with `ref` None, as one full reference in `model` ("digits@production").

    Raises ValueError for a malformed reference, one that names no model when it must, or another model.
    """
    if ref is None:
        parsed = parse_ref(model)
        if parsed.model is None:
            _fail(model, "names no model: write it as <model>@<alias> or <model>:<version>")
        return parsed.model, parsed.selector
    parsed = parse_ref(ref)
    if parsed.model is not None and parsed.model != model:
        raise ValueError(f"reference {str(ref)!r} names model {parsed.model!r}, not {model!r}")
    return model, parsed.selector


def _split_once(text: str, *separators: str) -> Tuple[Optional[str], str, str]:
    """(name, separator, rest) at the first of `separators` found in `text`; (None, "", text) when none is."""
    cut = min((text.find(s) for s in separators if s in text), default=-1)
    if cut < 0:
        return None, "", text
    return text[:cut], text[cut], text[cut + 1:]


def _check_selector(text: str, selector: str, sep: str) -> None:
    if sep in ("/", ":") and not (_is_number(selector) or selector == LATEST):
        _fail(text, f"after '{sep}' comes a version number or 'latest'; an alias follows '@'")
    if sep == "@" and _is_number(selector):
        _fail(text, "after '@' comes an alias; a version number follows ':' (or '/' in models:/)")
    if not (_is_number(selector) or is_identifier(selector)):
        _fail(text, f"invalid version or alias {selector!r}")


def _fail(text: str, why: str) -> NoReturn:
    raise ValueError(f"bad model reference {text!r}: {why} (forms: {FORMS})")


def _is_number(text: str) -> bool:
    # ASCII only: str.isdigit() holds for "²" and "١", which int() refuses or reads as another number.
    return text.isascii() and text.isdigit()
