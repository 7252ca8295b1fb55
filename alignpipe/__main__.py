from alignpipe.app.cli import main

main()
