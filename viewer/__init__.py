"""weightlapse.viewer: read runs; the Panel app (`panel serve viewer/`) and the research API it uses."""
