"""Stage 1, targets: what is probed. Layer names as the user spelled them (wrappers, globs,
output selectors), ``layers="auto"``, output layouts (channels-first, channels-last, tokens)
and seed positions."""
