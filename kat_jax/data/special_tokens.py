"""The special tokens every kat_jax tokenizer reserves (sentencepiece user-defined symbols, or the
matching tokens of a Hugging Face tokenizer). Names follow Qwen2.5-Coder / Qwen3 so that imported
checkpoints and our own tokenizers render conversations, tool calls and FIM identically."""

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"    # followed by the role name and a newline: system / user / assistant / tool
IM_END = "<|im_end|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
MEMORY_OPEN = "<memory>"      # context compression / memory events inside a trajectory
MEMORY_CLOSE = "</memory>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"

ALL = (
    END_OF_TEXT, PAD, IM_START, IM_END, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE, MEMORY_OPEN, MEMORY_CLOSE, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD,
    REPO_NAME, FILE_SEP,
)
