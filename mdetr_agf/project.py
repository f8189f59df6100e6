"""Where the project lives: the one spelling of its home that the package, hubconf, the README and
the notebook use (tests/test_project_home.py checks that every copy in the tree agrees)."""

#: The GitHub repository, as ``owner/name`` (what ``torch.hub.load`` takes).
REPOSITORY = "RU-CS535-ADOX/Interpreting-MDETR-Using-Attribution-Guided-Factorization"
#: The project's home page.
HOME = f"https://github.com/{REPOSITORY}"
#: The notebook opened in Google Colab, straight from the repository's main branch.
COLAB = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/demo.ipynb"
#: What ``pip install`` takes to install the package from its repository.
PIP_SOURCE = f"git+{HOME}"
