"""The miniature reproduction of the paper, fenced off from the library.

`demo_train` trains the embedded demo model from scratch on the synthetic face domain (`e4t demo-train`),
`demo` runs it end to end (`e4t demo`), `baselines` holds textual inversion and DreamBooth on one image,
`evaluate` the attribute read-out and the identity / prompt-fidelity metrics, `reproduce` the evaluation
protocol behind `e4t eval` and `docs/reproduction.md`. Nothing in the library imports from here.
"""
