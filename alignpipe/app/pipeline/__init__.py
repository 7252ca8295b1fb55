"""`alignpipe run`: a YAML plan over manifest, embed, fit, eval and similarity steps, each
reused from the cache when its spec matches (`runner`), the plan's checks (`planning`) and its
report (`report`)."""
