"""Training and evaluation data: records from JSONL files or built-in tasks, tokenised for causal LMs.

* :mod:`.records`: the :class:`Example` record and the JSONL reader (chat, prompt/completion,
  instruction/output and plain-text records; malformed lines are reported with their number).
* :mod:`.tasks`: built-in tasks made from offline packages, each with a held-out split and a metric.
* :mod:`.tokenize`: chat-template tokenisation with the loss on the completion only, and batching.
"""

from .records import Example, read_jsonl
from .tasks import TASKS, Task, get_task
from .tokenize import Batcher, encode_examples

__all__ = ["TASKS", "Batcher", "Example", "Task", "encode_examples", "get_task", "read_jsonl"]
