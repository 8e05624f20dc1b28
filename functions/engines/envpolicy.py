"""Which environment variables a function may set. The services refuse the others when they are
written; the engines drop them again when they build an instance's environment.

Pure, with no Django imports: the services and every engine use it, and engines never import the
services.
"""

from __future__ import annotations

from collections.abc import Mapping

# Names the platform sets itself (the shim contract, Knative, Kubernetes' service links); a
# function's value would shadow the platform's or be shadowed by it, depending on the engine.
PLATFORM_NAMES = frozenset({"PORT", "HOME", "PATH", "TMPDIR"})
PLATFORM_PREFIXES = ("K_", "NIMBUS_", "KUBERNETES_")

# Variables read before a function's first line runs: by the dynamic loader and libc (most of them
# glibc drops for setuid programs, its "unsecvars" list, which says how dangerous they are), by
# the shells and by the interpreters. Whoever sets them chooses code that runs inside whatever
# process starts with them, the sandbox launcher included. The platform sets the PYTHON* it needs.
START_UP_NAMES = frozenset({
    # loader and libc
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCPATH", "NIS_PATH", "NLSPATH",
    "RESOLV_HOST_CONF",
    # shells
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH",
    # Node.js
    "NODE_OPTIONS", "NODE_PATH", "NODE_REPL_EXTERNAL_MODULE",
    # Perl, Ruby
    "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB",
    # Java
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    # Go
    "GOFLAGS", "GODEBUG",
})
START_UP_PREFIXES = ("LD_", "MALLOC_", "PYTHON")


def refusal(name: str) -> str | None:
    """None if a function may set ``name``; otherwise one sentence, naming it, that says why not.

    Compared case-insensitively: the loader ignores ``ld_preload``, but a name that differs from a
    refused one only in case is never what a function needs, and other readers may fold case.
    """
    upper = name.upper()
    if upper in PLATFORM_NAMES or upper.startswith(PLATFORM_PREFIXES):
        return f"'{name}' is reserved by the platform."
    if upper in START_UP_NAMES or upper.startswith(START_UP_PREFIXES):
        return (f"'{name}' is refused: loader and interpreter variables (LD_*, GCONV_PATH, PYTHON*, "
                "NODE_OPTIONS, …) could change how the platform starts the function.")
    return None


def allowed(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the variables a function may set, the names dropped), for an engine building an instance's
    environment: rows written before this policy, or by anything that went around the services,
    must not reach a process either."""
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in env.items():
        if refusal(name) is None:
            kept[name] = value
        else:
            dropped.append(name)
    return kept, dropped
