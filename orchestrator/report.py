def add_cli_arguments(sub):
    pass
