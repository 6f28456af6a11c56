"""Training: the thesis's merged-dataset pipeline, from Kaggle layouts (or a labels CSV) to a
model bundle the daemon serves. Uses model/'s pixel pipeline and network; never imports daemon/."""
