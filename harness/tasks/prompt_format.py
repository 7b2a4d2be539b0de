"""How a task's prompt is laid out: plain text, or the model's chat template, as lm-eval builds it.

A context is a list of messages: an optional system message (``--system_instruction``), then per
few-shot example a user turn (its question, followed by the target delimiter) and an assistant turn
(its answer, followed by the few-shot delimiter), then the question itself. As plain text the
messages are concatenated, each followed by its delimiter. With a chat template they are rendered
by the tokenizer with a generation prompt, either as they are (``fewshot_as_multiturn``) or with
every turn but the system message joined into one user message (lm-eval's ``multiturn_to_singleturn``).
Under a chat template a choice or answer continues the assistant turn directly (no target delimiter),
as lm-eval's ``construct_requests`` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# renders chat messages ({"role", "content"} dicts) to the prompt text, with a generation prompt
ChatRenderer = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class PromptFormat:
    """``chat_template``: None (plain text), ``"default"`` (the tokenizer's template) or the name of
    one of the tokenizer's named templates."""

    chat_template: str | None = None
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    renderer: ChatRenderer | None = field(default=None, compare=False, repr=False)

    @property
    def chat(self) -> bool:
        return self.chat_template is not None

    def recorded(self) -> dict[str, Any]:
        """What the prompts depend on (the template's text is recorded with the run)."""
        return {"chat_template": self.chat_template, "system_instruction": self.system_instruction,
                "fewshot_as_multiturn": self.fewshot_as_multiturn}

    def answer_delimiter(self, delimiter: str = " ") -> str:
        """What separates the prompt from a scored continuation: none after a chat generation prompt."""
        return "" if self.chat else delimiter

    def context(self, shots: Sequence[tuple[str, str]], question: str, *, target_delimiter: str = " ",
                fewshot_delimiter: str = "\n\n") -> str:
        """The prompt for ``question`` after the (question, answer) ``shots``."""
        messages = []
        if self.system_instruction:
            messages.append(Message("system", self.system_instruction))
        for shot_question, shot_answer in shots:
            messages += [Message("user", shot_question, target_delimiter),
                         Message("assistant", shot_answer, fewshot_delimiter)]
        messages.append(Message("user", question))
        if not self.chat:
            return "".join(m.text() for m in messages)
        if self.renderer is None:
            raise RuntimeError("a chat prompt format needs the model's renderer")
        return self.renderer([m.as_dict() for m in messages] if self.fewshot_as_multiturn else single_turn(messages))


PLAIN = PromptFormat()


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    delimiter: str = ""  # appended in plain text

    def text(self) -> str:
        return self.content + self.delimiter

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def single_turn(messages: list[Message]) -> list[dict[str, str]]:
    """The system message (if any) and every other turn joined into one user message."""
    system = [messages[0].as_dict()] if messages[0].role == "system" else []
    turns = messages[len(system):]
    return system + [{"role": "user", "content": "".join(m.text() for m in turns[:-1]) + turns[-1].content}]
