"""The toy world: a test-bed where APL's effect can be seen and measured offline (README "Toy world").

Procedurally drawn named and anonymous toy people and scenes (render, world), a small SD v1-architecture model
trained on them by this repository (make_model, colour_codec), a toy recogniser behind the face-backend plug-in
interface (perception, make_perception, attributes), and the experiment that runs APL's real scripts on it
(experiment, references, grid). APL's own code never imports this package.
"""
