"""The HTTP segmentation service: a Ray Serve deployment with a FastAPI ingress (`serve.app`).

`serve.codec` turns request bytes into images and label maps into responses without Ray;
`serve.upload` reads the image out of an HTTP request within the body limit.
"""
