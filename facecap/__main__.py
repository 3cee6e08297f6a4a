from facecap.cli import run

run()
