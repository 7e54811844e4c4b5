from frozenseg.cli import app

app(prog_name="frozenseg")
