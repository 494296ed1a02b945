"""Pictures: masked-image reconstructions (:mod:`~mimkit.viz.reconstructions`, MAE Fig. 2 style) and attention maps
(:mod:`~mimkit.viz.attention`: RC-MAE Fig. 4, SdAE Fig. S-3). They read a method or an encoder and import nothing
above the models, so the training engine can draw its pictures with them."""
