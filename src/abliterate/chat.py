"""Chat with a result: a saved model folder (`abliterate chat DIR`) or the trial a study just saved
(`--chat`). Replies stream as they are generated; `/original` answers with the source model instead,
for comparison, and back; `/reset` starts the conversation again.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from abliterate.model import ChatModel

HELP = (
    "/original switches to the source model and back, /reset clears the history; an empty line or Ctrl-D ends"
)


class Chat:
    """A conversation with one of two models: the result, and on demand its original.

    Each is a callable that readies its model and returns it (loading it the first time, or, after a
    study, editing or resetting the one model in memory), so switching costs only what it must.
    """

    def __init__(
        self,
        result: Callable[[], ChatModel],
        original: Callable[[], ChatModel] | None,
        console: Console,
        max_new_tokens: int = 256,
    ):
        self.sources = {"result": result, "original": original}
        self.speaking = "result"
        self.model = result()
        self.console = console
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []

    def handle(self, line: str) -> bool:
        """Answer one line typed by the user; False when the chat should end."""
        line = line.strip()
        if not line:
            return False
        if line == "/reset":
            self.history = []
            self.console.print("history cleared")
        elif line == "/original":
            self.switch()
        elif line.startswith("/"):
            self.console.print(f"unknown command {line}; {HELP}", markup=False)
        else:
            self.history.append({"role": "user", "content": line})
            self.history.append({"role": "assistant", "content": self.reply()})
        return True

    def switch(self) -> None:
        target = "original" if self.speaking == "result" else "result"
        ready = self.sources[target]
        if ready is None:
            self.console.print("the original model is not known here; pass --original")
            return
        self.model = ready()
        self.speaking = target
        self.console.print(f"now answering: the {target} model (the history stays)")

    def reply(self) -> str:
        text = self.model.format_conversation(self.history)
        batch = self.model.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(
            self.model.input_device
        )
        stream = self.model.stream(dict(batch), self.max_new_tokens)
        with self.console.status("generating", spinner="dots"):
            pieces = [next(stream, "")]  # the prompt's prefill: a wait the user would otherwise not see
        self.console.print(pieces[0], end="", markup=False, highlight=False)
        for piece in stream:
            pieces.append(piece)
            self.console.print(piece, end="", markup=False, highlight=False)
        self.console.print()
        return "".join(pieces).strip()


def chat_loop(chat: Chat, read: Callable[[str], str] = input) -> None:
    """Read lines until an empty one or end of input. Lines typed while a reply streams wait in the
    terminal's buffer and are read next: none is lost."""
    chat.console.print(f"chat with the {chat.speaking} model; {HELP}")
    while True:
        try:
            line = read("> ")
        except EOFError:
            break
        if not chat.handle(line):
            break
