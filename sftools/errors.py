"""The one exception type users see.

Every refusal (an unsafe pickle, a corrupt file, mismatched shapes, an unknown layout) is raised as
`SftoolsError` with a one-line message that names the file, tensor or key. The CLI prints that line
and exits 1; anything else escaping is a bug, not a user mistake.
"""


class SftoolsError(Exception):
    """A refusal or failure explained in one line."""


class UnsafeCheckpoint(SftoolsError):
    """The file holds something that only code execution could rebuild; nothing of it was run."""


class SettingsError(SftoolsError):
    """A setting out of range or of the wrong kind; the command line reports it as a usage error (exit 2)."""


class QuantizationError(SftoolsError):
    """A tensor a quantized form cannot hold (inf or nan), or quantized values that read back
    outside the error bound of their type; nothing is renamed into place."""
